"""Time `snakemake -n` on a paper-scale DAG (issue 6): thousands of shards x several experiments.

By default the DAG comes from a generated Snakefile shaped like the project's (one job per shard and per stage,
never per image): fetch and shard per LAION shard, one dedup over all shards, then per experiment x seed a
pretraining, a high-resolution fine-tune, feature extraction and RASA per checkpoint, one evaluation per
benchmark x checkpoint (dense ones also with RASA), and one paper job over everything.

    .venv/bin/python benchmarks/bench_dag.py                       # 2,000 shards x 5 experiments
    .venv/bin/python benchmarks/bench_dag.py --shards 500 2000 8000
    .venv/bin/python benchmarks/bench_dag.py --snakefile Snakefile --workdir . -- --config preset=paper_vitl14_laion

Prints, for each size, the number of jobs in the dry run and its wall-clock time.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("bench_dag")

BENCHMARKS = ["knn", "linear", "logreg", "hummingbird", "linseg", "overcluster", "position"]
DENSE = ["hummingbird", "linseg", "overcluster", "position"]

SNAKEFILE = """
SHARDS = range({shards})
EXPS = {exps!r}
SEEDS = [0]
CKPTS = ["pretrain", "highres"]
BENCH = {bench!r}
DENSE = {dense!r}
EVALS = [f"{{b}}" for b in BENCH] + [f"{{b}}_rasa" for b in DENSE]

rule all:
    input: "results/paper/index.html"

rule fetch:
    output: "data/laion/raw/{{shard}}.tar"
    shell: "touch {{output}}"

rule shard:
    input: "data/laion/raw/{{shard}}.tar"
    output: "data/laion/shards/train-{{shard}}.tar"
    shell: "touch {{output}}"

rule dedup:
    input: expand("data/laion/shards/train-{{shard}}.tar", shard=SHARDS)
    output: "data/dedup/kept.txt"
    shell: "touch {{output}}"

rule pretrain:
    input: "data/dedup/kept.txt"
    output: "results/pretrain/{{exp}}/s{{seed}}/stage1/checkpoint.pt"
    shell: "touch {{output}}"

rule highres:
    input: "results/pretrain/{{exp}}/s{{seed}}/stage1/checkpoint.pt"
    output: "results/highres/{{exp}}/s{{seed}}/checkpoint.pt"
    shell: "touch {{output}}"

def ckpt_path(w):
    if w.ckpt == "highres":
        return f"results/highres/{{w.exp}}/s{{w.seed}}/checkpoint.pt"
    return f"results/pretrain/{{w.exp}}/s{{w.seed}}/stage1/checkpoint.pt"

rule features:
    input: ckpt_path
    output: "results/features/{{exp}}/s{{seed}}/{{ckpt}}/features.pt"
    shell: "touch {{output}}"

rule rasa:
    input: "results/features/{{exp}}/s{{seed}}/{{ckpt}}/features.pt"
    output: "results/rasa/{{exp}}/s{{seed}}/{{ckpt}}/rasa_head.pt"
    shell: "touch {{output}}"

rule evaluate:
    input:
        "results/features/{{exp}}/s{{seed}}/{{ckpt}}/features.pt",
        "results/rasa/{{exp}}/s{{seed}}/{{ckpt}}/rasa_head.pt",
    output: "results/eval/{{exp}}/s{{seed}}/{{ckpt}}/{{bench}}.json"
    shell: "touch {{output}}"

rule paper:
    input:
        expand("results/eval/{{exp}}/s{{seed}}/{{ckpt}}/{{bench}}.json", exp=EXPS, seed=SEEDS, ckpt=CKPTS, bench=EVALS)
    output: "results/paper/index.html"
    shell: "touch {{output}}"
"""


def write_snakefile(directory: Path, shards: int, experiments: int) -> Path:
    exps = [f"exp{i}" for i in range(experiments)]
    path = directory / "Snakefile"
    path.write_text(SNAKEFILE.format(shards=shards, exps=exps, bench=BENCHMARKS, dense=DENSE))
    return path


def dry_run(snakefile: Path, workdir: Path, extra: list[str]) -> tuple[int, float]:
    """(jobs in the DAG, wall-clock seconds) of `snakemake -n`."""
    snakemake = Path(sys.executable).with_name("snakemake")
    cmd = [str(snakemake), "-n", "--quiet", "rules", "--snakefile", str(snakefile), "--directory", str(workdir)]
    cmd += ["--cores", "1", *extra]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"snakemake -n failed ({' '.join(cmd)}):\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    match = re.search(r"^total\s+(\d+)\s*$", run.stdout + run.stderr, flags=re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no job count in the dry-run output of {' '.join(cmd)}")
    return int(match.group(1)), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[2000])
    parser.add_argument("--experiments", type=int, default=5)
    parser.add_argument("--snakefile", type=Path, help="time this Snakefile instead of the generated one")
    parser.add_argument("--workdir", type=Path, help="working directory for --snakefile (default: a temp dir)")
    parser.add_argument("extra", nargs="*", help="arguments after -- go to snakemake (e.g. --config ...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.snakefile is not None:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_dag_"))
        jobs, wall = dry_run(args.snakefile.resolve(), workdir.resolve(), args.extra)
        logger.info("%s: %d jobs, snakemake -n %.1f s", args.snakefile, jobs, wall)
        return 0
    for shards in args.shards:
        with tempfile.TemporaryDirectory(prefix="bench_dag_") as tmp:
            snakefile = write_snakefile(Path(tmp), shards, args.experiments)
            jobs, wall = dry_run(snakefile, Path(tmp), args.extra)
        logger.info("%d shards x %d experiments: %d jobs, snakemake -n %.1f s", shards, args.experiments, jobs, wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
