# Pretraining (franca/train): a list of stages; stage i>1 starts from stage i-1's weights. Rolling checkpoints live
# in work/ckpt/, which Snakemake never deletes, so a killed job rerun with the same command resumes.


rule pretrain:
    input:
        unpack(pretrain_inputs),
    output:
        ckpt="results/pretrain/{exp}/s{seed}/stage{stage}/checkpoint.pt",
        metrics="results/pretrain/{exp}/s{seed}/stage{stage}/metrics.jsonl",
    params:
        cfg=params_of("pretrain"),
        args=franca_args,
        init=lambda w, input: f"--init {input.init}" if "init" in input.keys() else "",
        launch=TRAIN_LAUNCH,
    wildcard_constraints:
        stage=r"\d+",
        seed=r"\d+",
    threads: 1
    resources:
        **train_resources("pretrain"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/pretrain/{exp}/s{seed}/stage{stage}.log",
    shell:
        "FRANCA_RULE=pretrain {params.launch} pretrain --stage-index {wildcards.stage} {params.init} "
        "--out results/pretrain/{wildcards.exp}/s{wildcards.seed}/stage{wildcards.stage} {params.args} 2> {log}"
