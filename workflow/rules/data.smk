# Data phases (franca/data): fetch raw bytes (or generate the tiny set), canonical shards + manifest, dedup.


rule fetch:
    output:
        directory("data/{dataset}/raw"),
    params:
        cfg=lambda w: fc.canonical_json(fc.dataset_config(BASE, w.dataset)),
        args=franca_args,
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/fetch/{dataset}.log",
    shell:
        "FRANCA_RULE=fetch franca data fetch --dataset {wildcards.dataset} --out {output} {params.args} 2> {log}"


rule shard:
    input:
        "data/{dataset}/raw",
    output:
        shards=directory("data/{dataset}/shards"),
        manifest="data/{dataset}/manifest.parquet",
    params:
        cfg=lambda w: fc.canonical_json(fc.dataset_config(BASE, w.dataset)),
        args=franca_args,
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/shard/{dataset}.log",
    shell:
        "FRANCA_RULE=shard franca data shard --dataset {wildcards.dataset} --raw {input} --out data/{wildcards.dataset} "
        "{params.args} 2> {log}"


rule dedup:
    input:
        manifests=expand("data/{dataset}/manifest.parquet", dataset=DATASETS),
        shards=expand("data/{dataset}/shards", dataset=DATASETS),
    output:
        kept="data/dedup/kept.txt",
        report="data/dedup/report.json",
        card="data/dedup/datacard.md",
    params:
        cfg=lambda w: fc.canonical_json(BASE["data"]["dedup"]),
        args=franca_args,
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/dedup.log",
    shell:
        "FRANCA_RULE=dedup franca data dedup --out data/dedup {params.args} 2> {log}"
