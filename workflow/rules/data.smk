# Data phases (franca/data): fetch raw bytes (or generate the tiny set), canonical shards + manifest, dedup.


rule fetch:
    input:
        config=lambda w: config_file(f"{CONFIGS}/data/{w.dataset}.json"),
    output:
        directory("data/{dataset}/raw"),
    params:
        tags=tags("fetch"),
    threads: threads_of("fetch")
    resources:
        **resources_of("fetch"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/fetch/{dataset}.log",
    shell:
        "franca data fetch --config {input.config} --dataset {wildcards.dataset} --out {output} --threads {threads} "
        "{params.tags} 2> {log}"


rule shard:
    input:
        config=lambda w: config_file(f"{CONFIGS}/data/{w.dataset}.json"),
        raw="data/{dataset}/raw",
    output:
        shards=directory("data/{dataset}/shards"),
        manifest="data/{dataset}/manifest.parquet",
    params:
        tags=tags("shard"),
    threads: threads_of("shard")
    resources:
        **resources_of("shard"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/shard/{dataset}.log",
    shell:
        "franca data shard --config {input.config} --dataset {wildcards.dataset} --raw {input.raw} "
        "--out data/{wildcards.dataset} --workers {threads} --threads {threads} {params.tags} 2> {log}"

