# Evaluations (spec 7) on the cached features of a checkpoint: every benchmark writes its own JSON and provenance
# record; one job runs all benchmarks of a checkpoint (one process start, not one per benchmark), and a second one
# the dense benchmarks with the checkpoint's RASA head when the experiment has RASA enabled. The params hold each
# benchmark's config slice, so editing one benchmark's YAML reruns the jobs that contain it.


rule evaluate:
    input:
        features="results/features/{exp}/s{seed}/{ckpt}/features.pt",
    output:
        expand("results/eval/{{exp}}/s{{seed}}/{{ckpt}}/{bench}.json", bench=BENCHMARKS),
    params:
        cfg=eval_params(BENCHMARKS),
        args=franca_args,
        benches=" ".join(BENCHMARKS),
    wildcard_constraints:
        seed=r"\d+",
        ckpt="pretrain|highres",
    threads: 1
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/eval/{exp}/s{seed}/{ckpt}.log",
    shell:
        "FRANCA_RULE=evaluate franca eval {params.benches} --features {input.features} "
        "--out-dir results/eval/{wildcards.exp}/s{wildcards.seed}/{wildcards.ckpt} {params.args} 2> {log}"


rule evaluate_rasa:
    input:
        features="results/features/{exp}/s{seed}/{ckpt}/features.pt",
        head="results/rasa/{exp}/s{seed}/{ckpt}/rasa_head.pt",
    output:
        expand("results/eval/{{exp}}/s{{seed}}/{{ckpt}}/{bench}_rasa.json", bench=DENSE_LIST),
    params:
        cfg=eval_params(DENSE_LIST),
        args=franca_args,
        benches=" ".join(DENSE_LIST),
    wildcard_constraints:
        seed=r"\d+",
        ckpt="pretrain|highres",
    threads: 1
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/eval/{exp}/s{seed}/{ckpt}.rasa.log",
    shell:
        "FRANCA_RULE=evaluate_rasa franca eval {params.benches} --features {input.features} --rasa-head {input.head} "
        "--out-dir results/eval/{wildcards.exp}/s{wildcards.seed}/{wildcards.ckpt} {params.args} 2> {log}"
