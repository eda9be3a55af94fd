"""What a launcher (torchrun, srun) told this process through its environment, readable without torch: the data
and bookkeeping jobs ask it (rank 0 alone tracks and writes provenance) and must not pay torch's import for it."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

__all__ = ["first_slurm_host", "launcher_env", "launcher_rank"]


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``"gpu[003-005,010],cpu1"`` -> ``"gpu003"``; ``"a,b"`` -> ``"a"``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_NODELIST is empty")
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if m is None:
        raise ValueError(f"cannot parse SLURM_NODELIST {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # keeps zero padding: "003-005" -> "003"
    return prefix + first


def launcher_env(env: Mapping[str, str]) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun or srun variables, or None when launched as a plain process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # srun sets the step's task count; SLURM_NTASKS alone is the allocation (also seen by an sbatch script)
        world_size = int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
        return int(env["SLURM_PROCID"]), world_size, int(env.get("SLURM_LOCALID", 0))
    return None


def launcher_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank as its launcher set it (torchrun ``RANK``, srun ``SLURM_PROCID``), readable before
    :func:`init_distributed`; 0 for a plain process. Code that must act on rank 0 alone before the process group
    exists (opening the MLflow run, writing provenance) asks this: under srun, ``RANK`` is only set by
    :func:`init_distributed`."""
    launch = launcher_env(os.environ if env is None else env)
    return launch[0] if launch is not None else 0
