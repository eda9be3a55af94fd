"""Provenance records: every stage writes `provenance.json` beside its outputs.

A record holds the stage's inputs and outputs with their sha256 and the file's stat signature (inode, size,
mtime_ns, ctime_ns: a later stage reuses a hash only when all four are unchanged; ctime cannot be set by a user, so
an edit with its mtime restored is re-hashed), the resolved config, the code version (git commit, dirty flag), the
package versions, the MLflow run id, the host and the wall time. `franca audit` (franca/audit.py) walks these records
from any artifact back to the fetched sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

FILENAME = "provenance.json"
_PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "snakemake",
    "dvc",
    "mlflow",
    "hydra-core",
    "webdataset",
    "pandas",
    "faiss-cpu",
    "scikit-learn",
    "pillow",
    "franca-repro",
)


_IGNORED = {".snakemake_timestamp"}  # Snakemake's marker in directory outputs, rewritten after the job


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files of `paths`, directories expanded recursively (provenance files of sub-stages excluded), sorted."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.name not in _IGNORED)
        elif path.exists():
            out.append(path)
        else:
            raise FileNotFoundError(f"provenance: input or output {path} does not exist")
    return out


def rel(path: str | Path) -> str:
    """Repo-relative POSIX path when under the working directory, else absolute. Symlinks are not followed: a link
    (the gather job's dataset handle) is recorded under its own name, so its producer is the job that made it."""
    path = Path(os.path.abspath(path))
    for root in (Path(os.path.abspath(Path.cwd())), Path.cwd().resolve()):
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.as_posix()


_SIGNATURE = ("ino", "size", "mtime_ns", "ctime_ns")


def signature(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"ino": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def file_record(path: Path, known: Mapping[str, Mapping] | None = None) -> dict[str, Any]:
    """{sha256, ino, size, mtime_ns, ctime_ns}; reuses a known hash only when the whole signature is unchanged."""
    sig = signature(path)
    previous = (known or {}).get(rel(path))
    if previous and all(previous.get(k) == sig[k] for k in _SIGNATURE):
        return {"sha256": previous["sha256"], **sig}
    return {"sha256": sha256_file(path), **sig}


def is_record(path: str | Path) -> bool:
    return Path(path).name == FILENAME or Path(path).name.endswith("." + FILENAME)


def find_record(path: str | Path) -> Path | None:
    """The provenance record that lists `path` as an output: `<stem>.provenance.json` beside it, else the
    provenance.json of its directory or of a parent."""
    target = rel(path)
    own = Path(path).resolve().parent / f"{Path(path).stem}.{FILENAME}"
    if own.is_file() and target in load(own).get("outputs", {}):
        return own
    for directory in [Path(path).resolve().parent, *Path(path).resolve().parents]:
        candidate = directory / FILENAME
        if candidate.is_file() and target in load(candidate).get("outputs", {}):
            return candidate
        if directory == Path.cwd().resolve():
            break
    return None


def load(path: str | Path) -> dict[str, Any]:
    with open(path) as handle:
        return json.load(handle)


def known_hashes(inputs: list[Path]) -> dict[str, Mapping]:
    """Output records of the stages that produced `inputs` (one lookup per directory)."""
    known: dict[str, Mapping] = {}
    seen: set[Path] = set()
    for path in inputs:
        record = None if path.parent in seen else find_record(path)
        seen.add(path.parent)
        if record is not None:
            known.update(load(record).get("outputs", {}))
    return known


def _source_cache(source: Path) -> Path:
    """The hash cache of a source (an input no stage produced: a URL list, an image folder) under FRANCA_HASH_CACHE."""
    key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:24]
    return Path(os.environ.get("FRANCA_HASH_CACHE", ".snakemake/franca_hashes")) / f"{key}.json"


def _load_source_hashes(source: Path) -> dict[str, Mapping]:
    """File records of `source` from the last job that hashed it (reused only where the signature is unchanged)."""
    try:
        return load(_source_cache(source))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _save_source_hashes(source: Path, records: Mapping[str, Mapping]) -> None:
    prefix = rel(source)
    own = {k: v for k, v in records.items() if k == prefix or k.startswith(prefix.rstrip("/") + "/")}
    atomic_write_text(_source_cache(source), json.dumps(own, sort_keys=True))


def unversioned(paths: Iterable[str]) -> set[str]:
    """Those of `paths` that DVC does not version (.dvcignore: raw downloads), by `dvc check-ignore`; a missing file
    among them is expected in a restored clone."""
    paths = sorted(paths)
    if not paths or not Path(".dvcignore").is_file():
        return set()
    result = subprocess.run(["dvc", "check-ignore", *paths], capture_output=True, text=True, check=False)
    return set(result.stdout.split()) & set(paths)


def code_version() -> dict[str, Any]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"git_commit": commit or "unknown", "dirty": dirty}


def packages() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    return versions


def write(
    out_dir: str | Path,
    *,
    stage: str,
    inputs: Iterable[str | Path],
    outputs: Iterable[str | Path],
    config: Mapping[str, Any],
    mlflow_run_id: str | None,
    started: float,
    extra: Mapping[str, Any] | None = None,
    name: str = FILENAME,
) -> Path:
    """Write `out_dir/<name>` atomically (`provenance.json`, or `<stem>.provenance.json` for one of several jobs
    sharing a directory) and return its path."""
    input_args = [Path(p) for p in inputs]
    input_files = [p for p in expand(input_args) if not is_record(p)]  # records are walked, not hashed
    known = known_hashes(input_files)
    # sources: inputs that no record produced (a URL list, an image folder)
    sources = [a for a in input_args if any(rel(f) not in known for f in expand([a]) if not is_record(f))]
    for source in sources:
        known.update(_load_source_hashes(source))
    input_records = {rel(p): file_record(p, known) for p in input_files}
    for source in sources:
        _save_source_hashes(source, input_records)
    record = {
        "stage": stage,
        "inputs": input_records,
        "outputs": {rel(p): file_record(p) for p in expand(outputs) if not is_record(p)},
        "config": dict(config),
        "code": code_version(),
        "packages": packages(),
        "mlflow_run_id": mlflow_run_id,
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": round(time.time() - started, 3),
        **(dict(extra) if extra else {}),
    }
    path = Path(out_dir) / name
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str))
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write then rename, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
