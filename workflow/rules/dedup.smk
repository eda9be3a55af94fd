# Dedup (franca/data/dedup.py): exact, near and eval-copy duplicates -> kept keys, report, data card.
# Without `fan_out` in the dedup config (the tiny preset: one small unit per dataset) the whole dedup runs in the one
# `dedup` job, so that the DAG keeps a single dedup job. With `fan_out: {bands, block_bits}` (paper scale) the
# per-image half fans out: the eval sets' index is built once, each work unit checks its images against it and
# writes its band index (dedup_unit), each (band, block) job writes the candidate pairs it owns (dedup_block), and
# `dedup` reads them all (pair verification, greedy removal, report).


wildcard_constraints:
    dataset=r"[^/]+",
    unit=r"u\d+",
    band=r"\d+",
    block=r"\d+",


rule dedup_eval_index:
    input:
        unpack(dedup_eval_inputs),
    output:
        "data/dedup/{dataset}/fan_out/eval_index.parquet",
    params:
        manifests=manifest_args,
        tags=tags("dedup_eval_index"),
    threads: threads_of("dedup_part")
    resources:
        **resources_of("dedup_part"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/dedup/{dataset}/eval_index.log",
    shell:
        "franca data dedup-eval-index --config {input.config} {params.manifests} --out {output} --threads {threads} "
        "{params.tags} 2> {log}"


rule dedup_unit:
    input:
        config=lambda w: config_file(f"{CONFIGS}/dedup/{w.dataset}.json"),
        manifest="data/{dataset}/units/{unit}/manifest.parquet",
        eval_index=rules.dedup_eval_index.output[0],
    output:
        matches="data/dedup/{dataset}/fan_out/units/{unit}/eval_matches.parquet",
        bands="data/dedup/{dataset}/fan_out/units/{unit}/bands.npy",
        offsets="data/dedup/{dataset}/fan_out/units/{unit}/offsets.npy",
        report="data/dedup/{dataset}/fan_out/units/{unit}/unit_report.json",
    params:
        tags=tags("dedup_unit"),
    threads: threads_of("dedup_part")
    resources:
        **resources_of("dedup_part"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/dedup/{dataset}/units/{unit}.log",
    shell:
        "franca data dedup-unit --config {input.config} --manifest {input.manifest} --unit {wildcards.unit} "
        "--eval-index {input.eval_index} --out data/dedup/{wildcards.dataset}/fan_out/units/{wildcards.unit} "
        "--threads {threads} {params.tags} 2> {log}"


# One light local job lists every unit's band index (sha256 from the unit records), so that each block job depends on
# one file: units + blocks DAG edges, not units x blocks (600 units x 4096 blocks would not build in minutes).
rule dedup_bands:
    localrule: True
    input:
        config=lambda w: config_file(f"{CONFIGS}/dedup/{w.dataset}.json"),
        manifest=dedup_manifest,
        index=lambda w: [f"data/dedup/{w.dataset}/fan_out/units/{u}/{name}" for u in dedup_unit_names(w.dataset)
                         for name in ("bands.npy", "offsets.npy")],
    output:
        "data/dedup/{dataset}/fan_out/bands.json",
    params:
        tags=tags("dedup_bands"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/dedup/{dataset}/bands.log",
    shell:
        "franca data dedup-bands --config {input.config} --units-dir data/dedup/{wildcards.dataset}/fan_out/units "
        "--manifest {input.manifest} --out {output} --threads 1 {params.tags} 2> {log}"


rule dedup_block:
    input:
        config=lambda w: config_file(f"{CONFIGS}/dedup/{w.dataset}.json"),
        manifest=dedup_manifest,
        bands=rules.dedup_bands.output[0],
    output:
        "data/dedup/{dataset}/fan_out/blocks/b{band}-p{block}.parquet",
    params:
        tags=tags("dedup_block"),
    threads: threads_of("dedup_part")
    resources:
        **resources_of("dedup_part"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/dedup/{dataset}/blocks/b{band}-p{block}.log",
    shell:
        "franca data dedup-block --config {input.config} --units-dir data/dedup/{wildcards.dataset}/fan_out/units "
        "--manifest {input.manifest} --bands-index {input.bands} --band {wildcards.band} --block {wildcards.block} "
        "--out {output} "
        "--threads {threads} {params.tags} 2> {log}"


rule dedup:
    input:
        unpack(dedup_fan_out_inputs),
    output:
        kept="data/dedup/{dataset}/kept.txt",
        report="data/dedup/{dataset}/report.json",
        card="data/dedup/{dataset}/datacard.md",
    params:
        manifests=manifest_args,
        fan_out=lambda w: f"--fan-out data/dedup/{w.dataset}/fan_out" if dedup_fan_out(w.dataset) else "",
        tags=tags("dedup"),
    threads: threads_of("dedup")
    resources:
        **resources_of("dedup"),
    conda:
        "../../envs/franca.yaml"
    log:
        "logs/dedup/{dataset}.log",
    shell:
        "franca data dedup --config {input.config} {params.manifests} {params.fan_out} "
        "--out data/dedup/{wildcards.dataset} --threads {threads} {params.tags} 2> {log}"
