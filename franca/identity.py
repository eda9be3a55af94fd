"""A job's full identity: its config slice, the sha256 of every input file and the code version.

State that outlives a job (rolling training checkpoints) lives under a directory named by this identity, so a rerun
after any change (a config value, an input's bytes, the code) never continues from state made under another one.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from franca import provenance

PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the package's Python sources (path and bytes): uncommitted edits count, unlike a git commit."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def input_hashes(paths: Iterable[str | Path]) -> dict[str, str]:
    """{repo-relative path: sha256} of every file of ``paths`` (directories expanded). Hashes recorded by the
    producing stage's provenance are reused when size and mtime match, so shards are not read again."""
    files = provenance.expand(paths)
    known = provenance.known_hashes(files)  # the producers' records
    return {provenance.rel(p): provenance.file_record(p, known)["sha256"] for p in files}


def job_identity(config: Mapping[str, Any], inputs: Iterable[str | Path]) -> str:
    """sha256 of (config slice, input hashes, code digest) as canonical JSON."""
    text = json.dumps(
        {"config": config, "inputs": input_hashes(inputs), "code": code_digest()},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()
