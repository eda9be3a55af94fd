# Data phases (franca/data): fetch raw bytes (or generate the tiny set) and shard them into canonical shards plus a
# manifest, one job per work unit (franca.data.units: a URL-table row range, or the whole of a local/generated set);
# gather links the units into the dataset's handle (data/<ds>/shards/, the partitioned data/<ds>/manifest/); dedup.


# gather only makes symlinks: it runs on the submitting host, without a queue wait (a SLURM job costs a poll cycle)
localrules:
    gather,


wildcard_constraints:
    dataset=r"[A-Za-z0-9_]+",
    unit=r"u\d{6}",


rule fetch:
    input:
        unpack(unit_inputs),
    output:
        directory("data/{dataset}/raw/{unit}"),
    params:
        tags=tags("fetch"),
    threads: threads_of("fetch")
    resources:
        **resources_of("fetch"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/fetch/{dataset}/{unit}.log",
    shell:
        "franca data fetch --config {input.config} --units {input.units} --unit {wildcards.unit} "
        "--dataset {wildcards.dataset} --out {output} --threads {threads} {params.tags} 2> {log}"


rule shard:
    input:
        config=lambda w: config_file(f"{CONFIGS}/data/{w.dataset}.json"),
        units=lambda w: units_file(w.dataset),
        raw="data/{dataset}/raw/{unit}",
    output:
        shards=directory("data/{dataset}/units/{unit}/shards"),
        manifest="data/{dataset}/units/{unit}/manifest.parquet",
    params:
        out=lambda w, output: os.path.dirname(output.manifest),
        tags=tags("shard"),
    threads: threads_of("shard")
    resources:
        **resources_of("shard"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/shard/{dataset}/{unit}.log",
    shell:
        "franca data shard --config {input.config} --units {input.units} --unit {wildcards.unit} "
        "--dataset {wildcards.dataset} --raw {input.raw} --out {params.out} --workers {threads} --threads {threads} "
        "{params.tags} 2> {log}"


rule gather:
    input:
        unpack(gather_inputs),
    output:
        shards=directory("data/{dataset}/shards"),
        manifest=directory("data/{dataset}/manifest"),
    params:
        units=lambda w, input: " ".join(os.path.dirname(m) for m in input.manifests),
        out=lambda w, output: os.path.dirname(output.manifest),
        tags=tags("gather"),
    threads: 1
    resources:
        **resources_of("gather"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/gather/{dataset}.log",
    shell:
        "franca data gather --config {input.config} --dataset {wildcards.dataset} --unit-dirs {params.units} "
        "--out {params.out} {params.tags} 2> {log}"

