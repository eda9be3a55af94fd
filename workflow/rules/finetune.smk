# High-resolution fine-tune (spec 4, stage 2): the teacher's pos_embed is resized offline (its own step), then
# training loads only the backbone into student and teacher, with fresh heads, optimizer and schedules.


rule highres_resize:
    input:
        config=job_config("highres"),
        ckpt=lambda w: checkpoint_path(w.exp, w.seed, "pretrain"),
    output:
        "results/highres/{exp}/s{seed}/init/teacher_resized.pt",
    params:
        tags=tags("highres_resize"),
    wildcard_constraints:
        seed=r"\d+",
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/highres/{exp}/s{seed}.resize.log",
    shell:
        "franca resize-pos-embed --config {input.config} --init {input.ckpt} --out {output} --threads {threads} "
        "{params.tags} 2> {log}"


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
