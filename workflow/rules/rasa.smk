# Evaluation features of a frozen checkpoint (cached once and kept, so that editing one benchmark reruns only
# that benchmark, and the audit can re-hash them), and RASA positional debiasing (spec 5).


rule features:
    input:
        ckpt=lambda w: checkpoint_path(w.exp, w.seed, w.ckpt),
        shards=eval_shards,
    output:
        features="results/features/{exp}/s{seed}/{ckpt}/features.pt",
        pca="results/features/{exp}/s{seed}/{ckpt}/pca.pt",
    params:
        cfg=params_of("features"),
        args=franca_args,
    wildcard_constraints:
        seed=r"\d+",
        ckpt="pretrain|highres",
    threads: 1
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/features/{exp}/s{seed}/{ckpt}.log",
    shell:
        "FRANCA_RULE=features franca features --checkpoint {input.ckpt} --ckpt-kind {wildcards.ckpt} "
        "--out results/features/{wildcards.exp}/s{wildcards.seed}/{wildcards.ckpt} {params.args} 2> {log}"


rule rasa:
    input:
        features="results/features/{exp}/s{seed}/{ckpt}/features.pt",
        ckpt=lambda w: checkpoint_path(w.exp, w.seed, w.ckpt),
    output:
        head="results/rasa/{exp}/s{seed}/{ckpt}/rasa_head.pt",
        report="results/rasa/{exp}/s{seed}/{ckpt}/report.json",
    params:
        cfg=params_of("rasa"),
        args=franca_args,
    wildcard_constraints:
        seed=r"\d+",
        ckpt="pretrain|highres",
    threads: 1
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/rasa/{exp}/s{seed}/{ckpt}.log",
    shell:
        "FRANCA_RULE=rasa franca rasa --features {input.features} --checkpoint {input.ckpt} "
        "--out results/rasa/{wildcards.exp}/s{wildcards.seed}/{wildcards.ckpt} {params.args} 2> {log}"
