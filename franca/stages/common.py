"""What every stage command shares: the job config file its rule hands it, the thread budget, the MLflow child run
and provenance."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from franca import config as fc
from franca import provenance, tracking
from franca.launcher import launcher_rank

log = logging.getLogger(__name__)


def add_job_args(parser: argparse.ArgumentParser) -> None:
    """What every stage job is handed by its rule (`franca config` writes the same files for a run by hand)."""
    parser.add_argument("--config", required=True, help="the job's resolved config slice (JSON)")
    parser.add_argument(
        "--run-config", default=None, help="orchestration JSON (config `run` group): never changes results"
    )
    parser.add_argument("--threads", type=int, default=1, help="one budget for torch, OpenMP and BLAS pools")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="MLflow tag (repeatable)")


def start(args: argparse.Namespace) -> dict[str, Any]:
    """Limit the thread pools and read the job's config slice (nothing is composed again here). ``--threads`` is the
    job's budget on this node: the processes of a torchrun / srun job share it."""
    limit_threads(max(1, args.threads // local_processes()))
    return fc.read_slice(args.config)


def local_processes() -> int:
    """Processes of this job on this node: torchrun's LOCAL_WORLD_SIZE, else srun's tasks per node, else 1."""
    env = os.environ
    if env.get("LOCAL_WORLD_SIZE", "").isdigit():
        return int(env["LOCAL_WORLD_SIZE"])
    if env.get("SLURM_STEP_NUM_TASKS", "").isdigit() and env.get("SLURM_STEP_NUM_NODES") == "1":
        return int(env["SLURM_STEP_NUM_TASKS"])  # inside `srun -n N` on one node
    return 1


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The orchestration settings of the job (`run` group of config/franca.yaml), or {} when none was given."""
    return fc.read_slice(args.run_config) if args.run_config else {}


def add_pairs_arg(parser: argparse.ArgumentParser, flag: str, value: str, help_text: str) -> None:
    """A repeatable ``--flag DATASET=<value>`` argument (read with :func:`parse_pairs`)."""
    parser.add_argument(flag, action="append", required=True, metavar=f"DATASET={value}", help=help_text)


def parse_pairs(pairs: Iterable[str], what: str) -> dict[str, str]:
    """["k=v", ...] -> {k: v}; a pair without "=" names itself in the error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what}: expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_threads(n: int) -> None:
    """One thread budget for every pool of the job: torch's and the OpenMP / BLAS pools of numpy, scipy, sklearn
    and faiss, so that jobs sharing the cores do not oversubscribe them (OpenMP workers spin while they wait)."""
    os.environ.update({var: str(n) for var in _THREAD_ENV})  # libraries loaded from now on
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(n)  # libraries already loaded (numpy's OpenBLAS, faiss's OpenMP, ...)


@dataclass
class Job:
    """A running stage: its MLflow run, and the outputs/extra fields its provenance will record."""

    run: tracking.Run
    out_dir: Path
    outputs: list[Path] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.run.log_metrics(metrics, step)


@contextlib.contextmanager
def job(
    stage: str,
    args: argparse.Namespace,
    cfg_slice: Mapping[str, Any],
    out_dir: str | Path,
    inputs: Iterable[str | Path],
    tags: Mapping[str, Any] | None = None,
    record: str = provenance.FILENAME,
) -> Iterator[Job]:
    """Open the child run, yield the Job, then write provenance.json (outputs default to out_dir) and tag the run."""
    started = time.time()
    main_rank = launcher_rank() == 0  # under torchrun / srun only rank 0 tracks and writes provenance
    if not main_rank:
        os.environ[tracking.ENV_OFF] = "off"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_tags = {
        "rule": stage,
        "stage": stage,
        **parse_pairs(getattr(args, "tag", []), "--tag"),
        "git_commit": provenance.code_version()["git_commit"],
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    name = "/".join(str(v) for v in (stage, *(tags or {}).values()))
    with tracking.Run(name, params=cfg_slice, tags=all_tags) as run:
        current = Job(run=run, out_dir=out_dir, inputs=[Path(p) for p in inputs])
        yield current
        if not main_rank:
            return
        record = provenance.write(
            out_dir,
            stage=stage,
            inputs=current.inputs,
            outputs=current.outputs or [out_dir],
            config=cfg_slice,
            mlflow_run_id=run.run_id,
            started=started,
            extra={"tags": all_tags, **current.extra},
            name=record,
        )
        run.set_tags(input_hash_tags(provenance.load(record)["inputs"]))
        run.log_artifact(record)
        log.info("%s done in %.1f s; provenance %s", stage, time.time() - started, record)


def input_hash_tags(inputs: Mapping[str, Mapping]) -> dict[str, str]:
    """One combined digest of all inputs, plus one tag per input when there are few."""
    digest = hashlib.sha256("".join(f"{p}:{r['sha256']}\n" for p, r in sorted(inputs.items())).encode()).hexdigest()
    tags = {"inputs_sha256": digest, "n_inputs": str(len(inputs))}
    if len(inputs) <= 20:
        # MLflow refuses keys that resolve to another name as paths ("//" of an absolute input)
        tags.update({f"input_sha256/{p.lstrip('/')}"[:250]: r["sha256"] for p, r in inputs.items()})
    return tags


def shard_files(shard_dir: str | Path, split: str) -> list[Path]:
    """The shards of one split in a shard directory handed to the job (``<split>-%06d.tar``)."""
    files = sorted(Path(shard_dir).glob(f"{split}-*.tar"))
    if not files:
        raise FileNotFoundError(f"no shards for split {split!r} in {shard_dir}")
    return files
