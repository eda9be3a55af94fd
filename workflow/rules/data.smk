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


rule dedup:
    input:
        unpack(dedup_inputs),
    output:
        kept="data/dedup/{dataset}/kept.txt",
        report="data/dedup/{dataset}/report.json",
        card="data/dedup/{dataset}/datacard.md",
    params:
        manifests=lambda w, input: " ".join(f"--manifest {p.split('/')[1]}={p}" for p in input.manifests),
        tags=tags("dedup"),
    threads: threads_of("dedup")
    resources:
        **resources_of("dedup"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/dedup/{dataset}.log",
    shell:
        "franca data dedup --config {input.config} {params.manifests} --out data/dedup/{wildcards.dataset} "
        "--threads {threads} {params.tags} 2> {log}"
