# The paper (franca/paper): tables, figures and index.html from exactly the files paper_inputs (common.smk) lists.


rule paper:
    input:
        unpack(paper_inputs),
    output:
        html=report("results/paper/index.html", caption="../report/paper.rst", category="Paper"),
        main="results/paper/main.csv",
        figures=report(
            directory("results/paper/figures"), patterns=["{name}.png"], caption="../report/figures.rst",
            category="Figures",
        ),
        ablation="results/paper/ablation.csv",
        baselines="results/paper/baselines.csv",
        highres="results/paper/highres.csv",
    params:
        experiments=lambda w: fc.canonical_json(EXPERIMENTS),
        preset=PRESET,
        dense=cfg(*RUNS[0])["data"]["dense"]["dataset"],
        out=lambda w, output: os.path.dirname(output.html),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/paper.log",
    shell:
        "franca paper --evals {input.evals} --metrics {input.metrics} --rasa {input.rasa} "
        "--pca {input.pca} --dedup {input.dedup} --manifests {input.manifests} --out {params.out} "
        "--preset {params.preset} --experiments '{params.experiments}' --dense-dataset {params.dense} 2> {log}"
