"""Process-group setup and model wrapping for franca.train (spec 1.1 "Precision", 4 stage 1, DESIGN "DAG").

* :func:`init_distributed` reads the launcher's environment: ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT) or SLURM ``srun`` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first host of
  SLURM_NODELIST, the port MASTER_PORT or one derived from SLURM_JOB_ID). The backend is NCCL on CUDA, gloo on CPU.
  With one process no group is created and every collective below is the identity.
* :func:`sk_all_reduce` is the collective injected into the Sinkhorn-Knopp losses (a sum over ranks).
* :func:`wrap_student` wraps each student sub-module with DDP (default) or FSDP (``train.distributed: fsdp``, CUDA
  only; the teacher is then sharded the same way so that the EMA pairs shards).
* Rank 0 alone writes files (:func:`is_main_process`).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from franca.launcher import first_slurm_host, launcher_env, launcher_rank

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "barrier",
    "first_slurm_host",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "launcher_rank",
    "mean_over_ranks",
    "module_dict_state",
    "is_sharded",
    "sk_all_reduce",
    "sk_all_reduce_max",
    "unwrap",
    "wrap_student",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process without a process group


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group from the launcher's environment (idempotent).

    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. A single process (no launcher variables, or a
    world size of 1) gets no process group.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but CUDA is not available")
    env = os.environ
    launch = launcher_env(env)
    rank, world_size, local_rank = launch if launch is not None else (0, 1, 0)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev, None)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" not in env:  # srun: torch's env:// init reads these four variables
            os.environ.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1")))
            job_port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
            os.environ.setdefault("MASTER_PORT", str(job_port))
            os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
            os.environ["LOCAL_RANK"] = str(local_rank)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        logger.info(
            "init process group backend=%s rank=%d/%d master=%s:%s",
            backend,
            rank,
            world_size,
            os.environ["MASTER_ADDR"],
            os.environ.get("MASTER_PORT"),
        )
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank, world_size, local_rank, dev, backend)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def sk_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in one process); returns the tensor. Injected into Sinkhorn-Knopp."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sk_all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks (identity in one process): the Sinkhorn-Knopp overflow guard's global max."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def mean_over_ranks(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Average scalar metrics over ranks with one all-reduce (for logging only)."""
    names = sorted(values)
    if not names:
        return {}
    vec = torch.stack([torch.as_tensor(values[n], dtype=torch.float64).detach().cpu().reshape(()) for n in names])
    if get_world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else vec.device
        vec = vec.to(dev)
        dist.all_reduce(vec, op=dist.ReduceOp.SUM)
        vec = vec.cpu() / get_world_size()
    return dict(zip(names, vec.tolist(), strict=True))


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable, trusted: our own processes), in rank order."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP with use_orig_params keeps names through its own state-dict hooks)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def module_dict_state(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """State dict of a ModuleDict with keys ``<name>.<param>`` whatever the wrappers; full tensors on CPU."""
    out = {}
    for name, module in modules.items():
        module = unwrap(module)
        if _is_fsdp(module):
            state = _fsdp_full_state_dict(module)
        else:
            state = module.state_dict()
        out.update({f"{name}.{k}": v.detach().cpu() for k, v in state.items()})
    return out


def is_sharded(modules: Mapping[str, nn.Module]) -> bool:
    """Whether any sub-module is FSDP-wrapped (its state dicts are then collectives)."""
    return any(_is_fsdp(unwrap(m)) for m in modules.values())


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def _fsdp_full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
    with FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT, cfg):
        return module.state_dict()


def wrap_student(model: nn.Module, mode: str, info: DistInfo, precision: str = "fp32") -> None:
    """Wrap ``model.student``'s sub-modules in place: DDP (``ddp``) or FSDP SHARD_GRAD_OP (``fsdp``, CUDA only).

    Without a process group (one plain process) nothing is wrapped; a group of one (``torchrun --nproc_per_node 1``,
    or a GPU check) is wrapped like any other. Under FSDP the teacher sub-modules are sharded identically (no grads), so
    the EMA of ``SSLMetaArch.update_teacher`` pairs local shards; DDP leaves the teacher replicated.
    """
    if info.backend is None:
        return
    if mode == "ddp":
        for name in list(model.student.keys()):
            module = model.student[name]
            ids = [info.device.index] if info.device.type == "cuda" else None
            model.student[name] = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return
    if mode == "fsdp":
        if info.device.type != "cuda":
            raise ValueError("config key 'train.distributed' is 'fsdp', which needs CUDA; use 'ddp' on CPU")
        _wrap_fsdp(model, info, precision)
        return
    raise ValueError(f"config key 'train.distributed' has unknown value {mode!r} (ddp|fsdp)")


def _wrap_fsdp(model: nn.Module, info: DistInfo, precision: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

    # spec 1.1: fp16 parameters, fp32 buffers; heads reduce gradients in fp32
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    blocks = getattr(unwrap(model.student["backbone"]), "blocks", None)
    # one FSDP unit per transformer block (same policy for student and teacher, so local shards pair up)
    policy = ModuleWrapPolicy({type(blocks[0])}) if blocks is not None and len(blocks) else None
    for tree in (model.student, model.teacher):
        for name in list(tree.keys()):
            reduce_dtype = torch.float32 if name != "backbone" else dtype
            mp = None
            if dtype is not None:
                mp = MixedPrecision(param_dtype=dtype, reduce_dtype=reduce_dtype, buffer_dtype=torch.float32)
            tree[name] = FSDP(
                tree[name],
                sharding_strategy=ShardingStrategy.SHARD_GRAD_OP,
                auto_wrap_policy=policy,
                mixed_precision=mp,
                device_id=info.device,
                use_orig_params=True,
                sync_module_states=True,
            )
