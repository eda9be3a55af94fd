# Pretraining (franca/train): a list of stages; stage i>1 starts from stage i-1's weights. Rolling checkpoints live
# in work/ckpt/<output>/<job identity>/, which Snakemake never deletes: a killed job rerun with the same inputs resumes.


rule pretrain:
    input:
        unpack(training_inputs("pretrain")),
    output:
        ckpt="results/pretrain/{exp}/s{seed}/stage{stage}/checkpoint.pt",
        metrics="results/pretrain/{exp}/s{seed}/stage{stage}/metrics.jsonl",
    params:
        run=run_config,
        init=optional("init", "init"),
        kept=optional("kept", "kept"),
        launch=train_launcher("pretrain"),
        out=lambda w, output: os.path.dirname(output.ckpt),
        tags=tags("pretrain"),
    wildcard_constraints:
        stage=r"\d+",
        seed=r"\d+",
    threads: threads_of("pretrain")
    resources:
        **resources_of("pretrain"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/pretrain/{exp}/s{seed}/stage{stage}.log",
    shell:
        "{params.launch} pretrain --config {input.config} --run-config {params.run} --shards {input.shards} "
        "{params.kept} {params.init} --out {params.out} --threads {threads} {params.tags} 2> {log}"
