"""`franca audit`: from any artifact back to the fetched sources, verifying every hash on the way.

Each stage's provenance.json lists its inputs and outputs with their sha256. The audit finds the record that
produced the artifact, re-hashes its outputs, then follows every input to the record that produced it, and checks
that the input's current hash is the one the consumer recorded. Inputs that no stage produced are allowed only where
the chain starts: the inputs of a fetch record (URL lists, image folders; the record names them with their
licenses) and files tracked by git (configs such as the paper's reference numbers). Any other input without a record
is a broken link (its producer's provenance.json was deleted or never written) and fails the audit.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from franca import provenance

SOURCE_STAGES = {"fetch"}  # stages whose inputs are the sources of the chain


class AuditError(RuntimeError):
    """A hash does not match its record, or an artifact has no provenance; the message names the file."""


@dataclass
class AuditReport:
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # record path -> record
    files_verified: int = 0
    sources: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # path -> role, resolved once the walk is done


def audit(path: str | Path) -> AuditReport:
    """Verify the provenance chain of `path` (an artifact or a provenance.json); problems are collected."""
    path = Path(path)
    record = path if provenance.is_record(path) else provenance.find_record(path)
    report = AuditReport()
    if record is None:
        report.problems.append(f"{path}: no provenance.json lists it as an output")
        return report
    _walk(Path(record), report, depth=0)
    not_kept = provenance.unversioned(report.missing)  # raw downloads: DVC does not version them
    for missing, role in report.missing.items():
        if missing in not_kept:
            report.lines.append(f"not kept: {missing} ({role}; a raw download DVC does not version)")
        else:
            report.problems.append(f"{missing} ({role}) is missing")
    return report


def _walk(record_path: Path, report: AuditReport, depth: int) -> None:
    key = provenance.rel(record_path)
    if key in report.records:
        return
    record = provenance.load(record_path)
    report.records[key] = record
    indent = "  " * depth
    report.lines.append(
        f"{indent}{record['stage']}: {key} (mlflow run {record.get('mlflow_run_id')}, "
        f"commit {record['code']['git_commit'][:12]}{' dirty' if record['code'].get('dirty') else ''})"
    )
    for out, rec in record["outputs"].items():
        _verify(out, rec["sha256"], f"output of {key}", report)
    for src in record.get("sources", []):
        report.sources.append(src)
        report.lines.append(f"{indent}  source: {src}")
    if "dedup" in record:
        report.lines.append(f"{indent}  dedup decisions: {record['dedup']}")
    producers: dict[str, None] = {}
    for inp, rec in record["inputs"].items():
        _verify(inp, rec["sha256"], f"input of {key}", report)
        producer = provenance.find_record(inp)  # also for a missing input: its producer's record is walked
        if producer is None and (
            record["stage"] in SOURCE_STAGES or provenance.is_record(inp) or inp in _git_files(str(Path.cwd()))
        ):
            report.lines.append(f"{indent}  external input: {inp} sha256 {rec['sha256'][:16]}")
        elif producer is None:
            report.problems.append(
                f"{inp} (input of {key}) has no provenance record: the provenance.json of the stage that produced it "
                "is missing"
            )
        else:
            producers[str(producer)] = None
    for producer in producers:
        _walk(Path(producer), report, depth + 1)


def _verify(path: str, expected: str, role: str, report: AuditReport) -> None:
    if not Path(path).exists():
        report.missing[path] = role
        return
    actual = provenance.sha256_file(path)
    report.files_verified += 1
    if actual != expected:
        report.problems.append(f"{path} ({role}) was modified: sha256 {actual[:16]} != recorded {expected[:16]}")


@functools.cache
def _git_files(cwd: str) -> frozenset[str]:
    """Repo-relative paths of the files git tracks in the working directory (empty outside a git checkout)."""
    result = subprocess.run(["git", "ls-files", "-z"], capture_output=True, text=True, check=False)
    return frozenset(result.stdout.split("\0")) if result.returncode == 0 else frozenset()
