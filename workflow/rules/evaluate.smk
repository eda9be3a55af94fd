# Evaluations (spec 7) on the cached features of a checkpoint: every benchmark writes its own JSON and provenance
# record; one job runs all benchmarks of a checkpoint (one process start, not one per benchmark), and a second one
# the dense benchmarks with the checkpoint's RASA head when the experiment has RASA enabled. Each job's config file
# holds its benchmarks' blocks, so editing one benchmark's YAML reruns the jobs that contain it. Experiments with
# different benchmark lists get one rule each (outputs are static patterns); with one list the rules keep their names.

for _i, (_benches, _exps) in enumerate(EVAL_GROUPS):
    _suffix = "" if len(EVAL_GROUPS) == 1 else f"_{_i}"
    _dense = [b for b in _benches if b in DENSE_BY_GROUP[_i]]

    rule:
        name:
            f"evaluate{_suffix}"
        input:
            config=job_config("eval"),
            features="results/features/{exp}/s{seed}/{ckpt}/features.pt",
        output:
            expand("results/eval/{{exp}}/s{{seed}}/{{ckpt}}/{bench}.json", bench=_benches),
        params:
            benches=" ".join(_benches),
            out=lambda w, output: os.path.dirname(output[0]),
            tags=tags(f"evaluate{_suffix}"),
        wildcard_constraints:
            exp="|".join(_exps),
            seed=r"\d+",
            ckpt="pretrain|highres",
        threads: threads_of("eval")
        resources:
            **resources_of("eval"),
        conda:
            "../../envs/franca.yaml"
        log:
            "logs/eval/{exp}/s{seed}/{ckpt}.log",
        shell:
            "franca eval {params.benches} --config {input.config} --features {input.features} "
            "--out-dir {params.out} --threads {threads} {params.tags} 2> {log}"

    rule:
        name:
            f"evaluate_rasa{_suffix}"
        input:
            config=job_config("eval_dense"),
            features="results/features/{exp}/s{seed}/{ckpt}/features.pt",
            head="results/rasa/{exp}/s{seed}/{ckpt}/rasa_head.pt",
        output:
            expand("results/eval/{{exp}}/s{{seed}}/{{ckpt}}/{bench}_rasa.json", bench=_dense),
        params:
            benches=" ".join(_dense),
            out=lambda w, output: os.path.dirname(output[0]),
            tags=tags(f"evaluate_rasa{_suffix}"),
        wildcard_constraints:
            exp="|".join(_exps),
            seed=r"\d+",
            ckpt="pretrain|highres",
        threads: threads_of("eval")
        resources:
            **resources_of("eval"),
        conda:
            "../../envs/franca.yaml"
        log:
            "logs/eval/{exp}/s{seed}/{ckpt}.rasa.log",
        shell:
            "franca eval {params.benches} --config {input.config} --features {input.features} "
            "--rasa-head {input.head} --out-dir {params.out} --threads {threads} {params.tags} "
            "2> {log}"
