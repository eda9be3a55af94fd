# Evaluation features of a frozen checkpoint (cached once and kept, so that editing one benchmark reruns only
# that benchmark, and the audit can re-hash them), and RASA positional debiasing (spec 5) on the cached tokens.


rule features:
    input:
        unpack(eval_shards),
        config=job_config("features"),
        ckpt=lambda w: checkpoint_path(w.exp, w.seed, w.ckpt),
    output:
        features="results/features/{exp}/s{seed}/{ckpt}/features.pt",
        pca="results/features/{exp}/s{seed}/{ckpt}/pca.pt",
    params:
        shards=shards_args,
        out=lambda w, output: os.path.dirname(output.features),
        # the references of the trained rows (random init, raw pixels) once per run, with its pretrain checkpoint
        baselines=lambda w: "--baselines" if w.ckpt == "pretrain" and eval_baselines(w) else "",
        tags=tags("features"),
    wildcard_constraints:
        seed=r"\d+",
        ckpt="pretrain|highres",
    threads: threads_of("features")
    resources:
        **resources_of("features"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/features/{exp}/s{seed}/{ckpt}.log",
    shell:
        "franca features --config {input.config} --checkpoint {input.ckpt} {params.shards} --out {params.out} "
        "{params.baselines} --threads {threads} {params.tags} 2> {log}"


rule rasa:
    input:
        config=job_config("rasa"),
        features="results/features/{exp}/s{seed}/{ckpt}/features.pt",
        ckpt=lambda w: checkpoint_path(w.exp, w.seed, w.ckpt),
    output:
        head="results/rasa/{exp}/s{seed}/{ckpt}/rasa_head.pt",
        report="results/rasa/{exp}/s{seed}/{ckpt}/report.json",
    params:
        out=lambda w, output: os.path.dirname(output.head),
        tags=tags("rasa"),
    wildcard_constraints:
        seed=r"\d+",
        ckpt="pretrain|highres",
    threads: threads_of("rasa")
    resources:
        **resources_of("rasa"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/rasa/{exp}/s{seed}/{ckpt}.log",
    shell:
        "franca rasa --config {input.config} --features {input.features} --checkpoint {input.ckpt} "
        "--out {params.out} --threads {threads} {params.tags} 2> {log}"
