# The paper (franca/paper): tables, figures and index.html from every result of this run.


def paper_inputs(wildcards):
    inputs = {"dedup": "data/dedup/report.json", "metrics": [], "evals": [], "rasa": [], "pca": []}
    for exp, seed in RUNS:
        inputs["metrics"].append(f"results/pretrain/{exp}/s{seed}/stage{n_stages(exp)}/metrics.jsonl")
        for ckpt in checkpoint_kinds(exp):
            if ckpt == "highres":
                inputs["metrics"].append(f"results/highres/{exp}/s{seed}/metrics.jsonl")
            inputs["evals"] += eval_outputs(exp, seed, ckpt)
            inputs["pca"].append(f"results/features/{exp}/s{seed}/{ckpt}/pca.pt")
            if EXPERIMENTS[exp]["rasa"]:
                inputs["rasa"].append(f"results/rasa/{exp}/s{seed}/{ckpt}/report.json")
    return inputs


rule paper:
    input:
        unpack(paper_inputs),
    output:
        html=report("results/paper/index.html", caption="../report/paper.rst", category="Paper"),
        main="results/paper/main.csv",
        ablation="results/paper/ablation.csv",
    params:
        experiments=lambda w: fc.canonical_json(EXPERIMENTS),
        preset=PRESET,
    log:
        "logs/paper.log",
    shell:
        "FRANCA_RULE={rule} franca paper --results results --out results/paper --preset {params.preset} "
        "--experiments '{params.experiments}' 2> {log}"
