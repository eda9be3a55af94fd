"""Checkpoints of franca.train (spec 2.5 "checkpoints", 4 stage 1 resubmission, docs/interfaces.md).

* Rolling checkpoints ``<ckpt_dir>/ckpt-<fingerprint>-<iteration>.pt`` hold everything a resumed run needs to continue
  exactly: student, teacher, optimizer, grad scaler, the next iteration, the data position and RNG states of every
  rank, and the resolved config. The fingerprint is a hash of the config's method keys, so runs of other configs
  sharing the directory are never resumed nor rotated away. Only the last ``keep`` of one fingerprint are kept.
* Every file is written atomically: a temporary file in the same directory, flushed and fsynced, then
  ``os.replace``; a crash leaves either the old or the new file, never a truncated one.
* Loading is ``torch.load(weights_only=True)`` only: RNG states are stored as tensors, ints and lists so that this
  works. A file that is not ours (no ``"format": "franca-ckpt-v1"`` tag, a pickle that needs code, random bytes)
  raises :class:`CheckpointFormatError` naming the file; nothing in it is executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "FORMAT_TAG",
    "CheckpointFormatError",
    "atomic_torch_save",
    "capture_rng_state",
    "config_fingerprint",
    "latest_rolling",
    "load_backbone",
    "load_checkpoint",
    "restore_rng_state",
    "save_final",
    "save_rolling",
]

logger = logging.getLogger(__name__)

FORMAT_TAG = "franca-ckpt-v1"

# "orchestration" keys: they change where and how often things are written, never the trained weights. The `run`
# group of config/franca.yaml is orchestration as a whole; the train.* spellings are accepted as well.
ORCHESTRATION_KEYS = (
    "run",
    "train.checkpoint_period",
    "train.keep_checkpoints",
    "train.log_period",
    "train.num_workers",
    "train.num_threads",
    "train.progress",
    "train.output_dir",
)


class CheckpointFormatError(ValueError):
    """Raised for a file that is not a franca checkpoint (it is never unpickled with code execution)."""


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync it, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (not supported on every filesystem)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a franca checkpoint with ``weights_only=True``; refuse anything else with :class:`CheckpointFormatError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
    ) as exc:
        raise CheckpointFormatError(
            f"{path} is not a franca checkpoint: refused to load it with weights_only=True ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_TAG:
        tag = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointFormatError(f"{path} is not a franca checkpoint: format tag {tag!r} != {FORMAT_TAG!r}")
    return obj


# ---- RNG states as weights_only-loadable values (tensors, ints, floats, strings, lists, dicts) ----


def _python_record(state: tuple) -> dict:
    version, internal, gauss = state
    return {
        "type": "python",
        "version": version,
        "state": torch.tensor(internal, dtype=torch.int64),
        "gauss": gauss,
    }


def _python_state(rec: Mapping) -> tuple:
    return rec["version"], tuple(int(v) for v in rec["state"].tolist()), rec["gauss"]


def _mt_record(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    keys = torch.from_numpy(np.asarray(keys).astype(np.int64))
    return {"type": "numpy_randomstate", "name": name, "keys": keys, "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}  # fmt: skip


def _mt_state(rec: Mapping) -> tuple:
    return (
        rec["name"],
        rec["keys"].numpy().astype(np.uint32),
        rec["pos"],
        rec["has_gauss"],
        rec["cached"],
    )


def _encode_generator(gen) -> dict:
    if isinstance(gen, random.Random):
        return _python_record(gen.getstate())
    if isinstance(gen, np.random.Generator):  # PCG64 & co: a dict of (big) ints and strings, kept as JSON text
        return {"type": "numpy_generator", "state": json.dumps(gen.bit_generator.state)}
    if isinstance(gen, np.random.RandomState):
        return _mt_record(gen.get_state(legacy=True))
    if isinstance(gen, torch.Generator):
        return {"type": "torch_generator", "state": gen.get_state()}
    raise TypeError(f"cannot checkpoint a random generator of type {type(gen).__name__}")


def _decode_into(gen, rec: Mapping) -> None:
    kind = rec["type"]
    if kind == "python":
        gen.setstate(_python_state(rec))
    elif kind == "numpy_generator":
        gen.bit_generator.state = json.loads(rec["state"])
    elif kind == "numpy_randomstate":
        gen.set_state(_mt_state(rec))
    elif kind == "torch_generator":
        gen.set_state(rec["state"])
    else:
        raise CheckpointFormatError(f"unknown RNG record type {kind!r}")


def capture_rng_state(extra: Mapping[str, object] | None = None) -> dict:
    """Global torch (CPU and CUDA), NumPy and Python RNG states, plus named extra generators (masking, collate)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _mt_record(np.random.get_state(legacy=True)),
        "python": _python_record(random.getstate()),
        "extra": {name: _encode_generator(gen) for name, gen in (extra or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping, extra: Mapping[str, object] | None = None) -> None:
    """Inverse of :func:`capture_rng_state`; every named extra generator must be present in ``state``."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_mt_state(state["numpy"]))
    random.setstate(_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (extra or {}).items():
        if name not in state["extra"]:
            raise CheckpointFormatError(f"checkpoint has no RNG state for {name!r}")
        _decode_into(gen, state["extra"][name])


def _drop_dotted(cfg: Mapping, dotted: str) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.get(p) if isinstance(node, Mapping) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(last, None)


def config_fingerprint(cfg: Mapping) -> str:
    """16 hex digits of sha256 over the config's method keys (orchestration keys removed), sorted JSON."""
    plain = json.loads(json.dumps(cfg, sort_keys=True, default=str))
    for key in ORCHESTRATION_KEYS:
        _drop_dotted(plain, key)
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


_ROLLING_RE = re.compile(r"^ckpt-(?P<fp>[0-9a-f]{16})-(?P<it>\d{9})\.pt$")


def _rolling_files(ckpt_dir: Path, fingerprint: str) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _ROLLING_RE.match(p.name)
        if m and m["fp"] == fingerprint:
            found.append((int(m["it"]), p))
    return sorted(found)


def save_rolling(
    ckpt_dir: str | os.PathLike,
    state: Mapping,
    cfg: Mapping,
    iteration: int,
    keep: int = 2,
) -> Path:
    """Write ``state`` (plus format tag, config, fingerprint, iteration) and delete all but the last ``keep``."""
    ckpt_dir = Path(ckpt_dir)
    fp = config_fingerprint(cfg)
    payload = dict(state) | {
        "format": FORMAT_TAG,
        "config": cfg,
        "config_fingerprint": fp,
        "iteration": int(iteration),
    }
    path = atomic_torch_save(payload, ckpt_dir / f"ckpt-{fp}-{int(iteration):09d}.pt")
    for _, old in _rolling_files(ckpt_dir, fp)[: -max(int(keep), 1)]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    logger.info("saved rolling checkpoint %s", path)
    return path


def latest_rolling(ckpt_dir: str | os.PathLike, cfg: Mapping) -> dict | None:
    """The newest readable rolling checkpoint of this config in ``ckpt_dir``, or None.

    A newest file that fails to load is reported and the previous one is tried (a crash cannot leave a partial file,
    but a disk can). A file whose stored config differs from ``cfg`` (fingerprint collision) is skipped.
    """
    fp = config_fingerprint(cfg)
    for _, path in reversed(_rolling_files(Path(ckpt_dir), fp)):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointFormatError as exc:
            logger.warning("skipping unreadable checkpoint: %s", exc)
            continue
        if config_fingerprint(ckpt.get("config", {})) != fp:
            logger.warning("skipping %s: its stored config differs from the current one", path)
            continue
        ckpt["path"] = str(path)
        return ckpt
    return None


def save_final(path: str | os.PathLike, model: nn.Module, cfg: Mapping, it: int) -> Path:
    """The final checkpoint of docs/interfaces.md: format, teacher, student (prefixed state dicts), config, iteration.

    ``model`` is an SSLMetaArch (``.student`` / ``.teacher`` ModuleDicts, possibly DDP/FSDP-wrapped sub-modules).
    Under a process group every rank must call it (FSDP gathers the full state); rank 0 alone writes the file.
    """
    from franca.train.distributed import is_main_process, is_sharded, module_dict_state

    if not (is_main_process() or is_sharded(model.student)):
        return Path(path)
    payload = {
        "format": FORMAT_TAG,
        "teacher": module_dict_state(model.teacher),
        "student": module_dict_state(model.student),
        "config": cfg,
        "iteration": int(it),
    }
    return atomic_torch_save(payload, path) if is_main_process() else Path(path)


def load_backbone(path: str | os.PathLike, map_location="cpu") -> tuple[nn.Module, dict]:
    """Build the teacher backbone of a franca checkpoint for evaluation: (backbone in eval mode, config)."""
    from franca.models.vision_transformer import build_backbone

    ckpt = load_checkpoint(path, map_location=map_location)
    for key in ("teacher", "config"):
        if key not in ckpt:
            raise CheckpointFormatError(f"{path} has no '{key}' entry")
    cfg = ckpt["config"]
    if "model" not in cfg:
        raise CheckpointFormatError(f"{path}: its config has no 'model' section")
    backbone = build_backbone(cfg["model"])
    state = {k[len("backbone.") :]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    if not state:
        raise CheckpointFormatError(f"{path}: the teacher state dict has no 'backbone.*' keys")
    backbone.load_state_dict(state, strict=True)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone, cfg
