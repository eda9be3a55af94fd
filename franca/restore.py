"""Restore artifacts from the DVC remote without triggering recomputation.

`dvc pull` verifies content against dvc.lock but writes files in an arbitrary order with fresh modification times,
and Snakemake reruns a job whose input is newer than its output. The provenance records give the real dependency
order: each record's outputs get a time later than every output of the records that produced its inputs. Setting
the times in that order (after verifying every output hash) makes `snakemake -n` report nothing to do.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

from franca import provenance

log = logging.getLogger(__name__)
TIMESTAMP = ".snakemake_timestamp"  # Snakemake's marker inside directory outputs


class RestoreError(RuntimeError):
    pass


def dvc_pull(remote: str | None = None) -> None:
    cmd = ["dvc", "pull", "--quiet"] + (["--remote", remote] if remote else [])
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RestoreError(f"dvc pull failed: {result.stderr.strip()}")


def records(roots: list[str | Path]) -> dict[str, dict]:
    found = {}
    for root in map(Path, roots):
        for path in sorted(root.rglob("*" + provenance.FILENAME)) if root.exists() else []:
            found[provenance.rel(path)] = provenance.load(path)
    return found


def depths(recs: dict[str, dict]) -> dict[str, int]:
    """Longest chain of producing records below each record (sources are depth 0)."""
    producer = {out: key for key, rec in recs.items() for out in rec["outputs"]}
    memo: dict[str, int] = {}

    def depth(key: str, stack: tuple[str, ...] = ()) -> int:
        if key in memo:
            return memo[key]
        if key in stack:
            raise RestoreError(f"provenance cycle through {key}")
        parents = {producer[i] for i in recs[key]["inputs"] if i in producer and producer[i] != key}
        memo[key] = 1 + max((depth(p, (*stack, key)) for p in parents), default=0)
        return memo[key]

    return {key: depth(key) for key in recs}


def verify_records(recs: dict[str, dict]) -> None:
    """Every record's outputs hash as recorded, and every consumer recorded the current hash of each input that
    another record produced; else RestoreError naming each file (nothing has been touched yet)."""
    problems, current = [], {}
    missing = {out for rec in recs.values() for out in rec["outputs"] if not Path(out).is_file()}
    not_kept = provenance.unversioned(missing)  # raw downloads, not in DVC: absent after a pull
    for key, rec in recs.items():
        for out, expected in rec["outputs"].items():
            if out in missing:
                if out not in not_kept:
                    problems.append(f"{out}: missing (output of {key})")
                continue
            current[out] = provenance.sha256_file(out)
            if current[out] != expected["sha256"]:
                problems.append(f"{out}: content differs from its provenance record {key}")
    for key, rec in recs.items():
        for inp, expected in rec["inputs"].items():
            if inp in current and current[inp] != expected["sha256"]:
                problems.append(
                    f"{key}: recorded input {inp} with sha256 {expected['sha256'][:16]}, but the file is now "
                    f"{current[inp][:16]}: this result is stale (rerun its rule)"
                )
    if problems:
        raise RestoreError("restore refused, no file time changed:\n  " + "\n  ".join(problems))


def restore_times(roots: list[str | Path], verify: bool = True) -> int:
    """Verify outputs and consumers' inputs (optional), then set times in dependency order; returns files touched."""
    recs = records(roots)
    if verify:
        verify_records(recs)
    base = time.time() - 10_000
    touched = 0
    for key, level in sorted(depths(recs).items(), key=lambda kv: kv[1]):
        stamp = base + 10 * level
        for out in recs[key]["outputs"]:
            if Path(out).is_file():  # else a raw download DVC does not keep (checked by verify_records)
                os.utime(out, (stamp, stamp))
                touched += 1
        for marker in [Path(key), *_markers(Path(key).parent, recs[key]["outputs"])]:
            os.utime(marker, (stamp + 1, stamp + 1))
            touched += 1
    log.info("restored times of %d files from %d provenance records", touched, len(recs))
    return touched


def _markers(record_dir: Path, outputs: dict) -> set[Path]:
    """Snakemake timestamp markers of the directory outputs that hold this record's outputs."""
    found = set()
    for out in outputs:
        for parent in Path(out).parents:
            if (parent / TIMESTAMP).exists():
                found.add(parent / TIMESTAMP)
            if parent == record_dir or parent == Path("."):
                break
    return found
