# High-resolution fine-tune (spec 4, stage 2): the teacher's pos_embed is resized offline (its own step), then
# training loads only the backbone into student and teacher, with fresh heads, optimizer and schedules.


rule highres_resize:
    input:
        lambda w: checkpoint_path(w.exp, w.seed, "pretrain"),
    output:
        "results/highres/{exp}/s{seed}/init/teacher_resized.pt",
    params:
        cfg=params_of("highres"),
        args=franca_args,
    wildcard_constraints:
        seed=r"\d+",
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/highres/{exp}/s{seed}.resize.log",
    shell:
        "FRANCA_RULE=highres_resize franca resize-pos-embed --init {input} --out {output} {params.args} 2> {log}"


rule highres:
    input:
        init="results/highres/{exp}/s{seed}/init/teacher_resized.pt",
        kept="data/dedup/kept.txt",
        shards=lambda w: shard_dir(dataset_of("highres", w.exp)),
    output:
        ckpt="results/highres/{exp}/s{seed}/checkpoint.pt",
        metrics="results/highres/{exp}/s{seed}/metrics.jsonl",
    params:
        cfg=params_of("highres"),
        args=franca_args,
        launch=HIGHRES_LAUNCH,
    wildcard_constraints:
        seed=r"\d+",
    threads: 1
    resources:
        **train_resources("highres"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/highres/{exp}/s{seed}.log",
    shell:
        "FRANCA_RULE=highres {params.launch} highres --init {input.init} "
        "--out results/highres/{wildcards.exp}/s{wildcards.seed} {params.args} 2> {log}"
