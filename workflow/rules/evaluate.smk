# Evaluations (spec 7), one job per benchmark x checkpoint, on the cached features. Dense benchmarks also run with
# the checkpoint's RASA head when the experiment has RASA enabled.


def eval_inputs(wildcards):
    inputs = {"features": f"results/features/{wildcards.exp}/s{wildcards.seed}/{wildcards.ckpt}/features.pt"}
    if wildcards.bench in DENSE and EXPERIMENTS[wildcards.exp]["rasa"]:
        inputs["rasa"] = f"results/rasa/{wildcards.exp}/s{wildcards.seed}/{wildcards.ckpt}/rasa_head.pt"
    return inputs


def eval_outputs(exp, seed, ckpt):
    out = []
    for bench in BENCHMARKS:
        out.append(f"results/eval/{exp}/s{seed}/{ckpt}/{bench}.json")
    return out


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        "results/eval/{exp}/s{seed}/{ckpt}/{bench}.json",
    params:
        cfg=lambda w: fc.canonical_json(fc.stage_config(cfg(w.exp, w.seed), f"eval:{w.bench}")),
        args=franca_args,
        rasa=lambda w, input: f"--rasa-head {input.rasa}" if "rasa" in input.keys() else "",
    wildcard_constraints:
        seed=r"\d+",
        ckpt="pretrain|highres",
        bench="|".join(BENCHMARKS),
    threads: 1
    log:
        "logs/eval/{exp}/s{seed}/{ckpt}/{bench}.log",
    shell:
        "{FRANCA} eval {wildcards.bench} --features {input.features} {params.rasa} --out {output} "
        "{params.args} 2> {log}"
