# Evaluations (spec 7) on the cached features of a checkpoint: every benchmark writes its own JSON and provenance
# record. One job per checkpoint runs all its benchmarks on one load of the features (one process start, not one
# per benchmark), and, when the experiment has RASA enabled, the dense benchmarks again with the checkpoint's RASA
# head. The job's config file holds its benchmarks' blocks, so editing one benchmark's YAML reruns the jobs that
# contain it. Experiments with different benchmark lists or RASA settings get one rule each (outputs are static
# patterns): the first experiment's kind is `evaluate`, the others `evaluate_1`, `evaluate_2`, ...

for _i, (_benches, _dense, _exps) in enumerate(EVAL_GROUPS):
    _suffix = f"_{_i}" if _i else ""

    rule:
        name:
            f"evaluate{_suffix}"
        input:
            config=job_config("eval"),
            features="results/features/{exp}/s{seed}/{ckpt}/features.pt",
            **({"head": "results/rasa/{exp}/s{seed}/{ckpt}/rasa_head.pt"} if _dense else {}),
        output:
            expand("results/eval/{{exp}}/s{{seed}}/{{ckpt}}/{bench}.json", bench=_benches),
            expand("results/eval/{{exp}}/s{{seed}}/{{ckpt}}/{bench}_rasa.json", bench=_dense),
        params:
            benches=" ".join(_benches),
            rasa=rasa_eval_args(_dense),
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
            "{params.rasa}--out-dir {params.out} --threads {threads} {params.tags} 2> {log}"
