# High-resolution fine-tune (spec 4, stage 2): the job resizes the pretraining teacher's pos_embed to the new grid (the
# official offline step, done in memory; `franca resize-pos-embed` writes it as a file), then loads only the backbone
# into student and teacher, with fresh heads, optimizer and schedules.


rule highres:
    input:
        unpack(training_inputs("highres")),
    output:
        ckpt="results/highres/{exp}/s{seed}/checkpoint.pt",
        metrics="results/highres/{exp}/s{seed}/metrics.jsonl",
    params:
        run=run_config,
        kept=optional("kept", "kept"),
        launch=train_launcher("highres"),
        out=lambda w, output: os.path.dirname(output.ckpt),
        tags=tags("highres"),
    wildcard_constraints:
        seed=r"\d+",
    threads: threads_of("highres")
    resources:
        **resources_of("highres"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/highres/{exp}/s{seed}.log",
    shell:
        "{params.launch} highres --config {input.config} --run-config {params.run} --shards {input.shards} "
        "{params.kept} --init {input.init} --out {params.out} --threads {threads} {params.tags} "
        "2> {log}"
