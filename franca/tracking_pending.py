"""A job's tracking records kept locally while the store is unreachable, and their upload later.

`<pending dir>/<uuid>/ops.json` holds the run id (null when the run could not even be created), the store and the
operations not yet sent, in order; artifacts are copied beside it (the job may change them later). The workflow's
onstart and onsuccess/onerror hooks call `sync_pending`, which replays each record on the store and removes it; a
record that still cannot be sent stays for the next sync.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from franca import tracking
from franca.provenance import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class Pending:
    directory: Path
    run_id: str | None
    reason: str
    ops: list[list] = field(default_factory=list)  # [op, payload]

    @classmethod
    def open(cls, run_id: str | None, err: BaseException) -> Pending:
        directory = tracking.pending_dir() / uuid.uuid4().hex
        directory.mkdir(parents=True)
        pending = cls(directory, run_id, f"{err.__class__.__name__}: {str(err)[:500]}")
        pending.save()
        return pending

    def add(self, op: str, payload: dict) -> None:
        if op == "artifact":  # keep the content as it is now
            src = Path(payload["path"])
            dest = self.directory / "artifacts" / f"{len(self.ops)}" / src.name
            dest.parent.mkdir(parents=True)
            shutil.copyfile(src, dest)
            payload = {"path": str(dest.resolve())}
        self.ops.append([op, payload])
        self.save()

    def save(self) -> None:
        body = {"uri": tracking.tracking_uri(), "run_id": self.run_id, "reason": self.reason, "ops": self.ops}
        atomic_write_text(self.directory / "ops.json", json.dumps(body, indent=1))

    def close(self) -> None:
        self.save()

    def __str__(self) -> str:
        return str(self.directory)


def sync_pending() -> int:
    """Upload every pending record to the store; returns how many remain (still unreachable)."""
    root = tracking.pending_dir()
    records = sorted(root.glob("*/ops.json")) if root.is_dir() else []
    if not records or not tracking.enabled():
        return len(records)
    try:
        mlflow = tracking.retry(tracking.client)
    except Exception as err:
        if not tracking.unreachable(err):
            raise
        log.warning(
            "tracking store still unreachable; %d pending records kept for the next sync (%s)", len(records), err
        )
        return len(records)
    left = 0
    for path in records:
        body = json.loads(path.read_text())
        pending = Pending(path.parent, body["run_id"], body["reason"], body["ops"])
        while pending.ops:
            op, payload = pending.ops[0]
            try:
                tracking.send(mlflow, pending, op, payload)
            except Exception as err:
                if not tracking.unreachable(err):
                    raise
                log.warning("tracking store still unreachable; %s kept for the next sync (%s)", path.parent, err)
                break
            pending.ops.pop(0)
            pending.save()
        if pending.ops:
            left += 1
        else:
            log.info("uploaded pending tracking records %s to run %s", path.parent, pending.run_id)
            shutil.rmtree(path.parent)
    return left
