# High-resolution fine-tune (spec 4, stage 2): pos_embed resized offline, backbone-only load, fresh heads.


rule highres:
    input:
        init=lambda w: checkpoint_path(w.exp, w.seed, "pretrain"),
        kept="data/dedup/kept.txt",
        shards=lambda w: shard_dir(dataset_of("highres", w.exp)),
    output:
        ckpt="results/highres/{exp}/s{seed}/checkpoint.pt",
        metrics="results/highres/{exp}/s{seed}/metrics.jsonl",
    params:
        cfg=params_of("highres"),
        args=franca_args,
    wildcard_constraints:
        seed=r"\d+",
    threads: 1
    resources:
        **train_resources("highres"),
    log:
        "logs/highres/{exp}/s{seed}.log",
    shell:
        "{TRAIN_LAUNCH} highres --init {input.init} --out results/highres/{wildcards.exp}/s{wildcards.seed} "
        "{params.args} 2> {log}"
