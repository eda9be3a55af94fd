"""MLflow tracking: one parent run per workflow invocation, one child run per job.

The workflow's `onstart` opens the parent run and exports its id in `FRANCA_PARENT_RUN_ID`; every `franca` stage
opens a child run tagged `mlflow.parentRunId`. The default store is `sqlite:///mlflow.db` at the repo root. Parallel
jobs share that sqlite file, so every write goes through `_retry` (sqlite answers "database is locked" while another
process writes) and step metrics are buffered and sent with `log_batch`.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_URI = "FRANCA_TRACKING_URI"
ENV_EXPERIMENT = "FRANCA_MLFLOW_EXPERIMENT"
ENV_PARENT = "FRANCA_PARENT_RUN_ID"
ENV_OFF = "FRANCA_TRACKING"  # "off" disables tracking (unit tests, quick manual runs)
DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "franca-repro"
_MAX_PARAM_LEN = 6000


def enabled() -> bool:
    return os.environ.get(ENV_OFF, "on").lower() not in ("off", "0", "false")


def _client():
    os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")  # no pooled connections held by jobs
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=os.environ.get(ENV_URI, DEFAULT_URI))


def _retry(fn: Callable, *args, attempts: int = 30, **kwargs):
    """Call `fn`, retrying while sqlite reports a lock held by a parallel job."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # sqlalchemy wraps sqlite3.OperationalError in MlflowException
            text = str(err).lower()
            if ("locked" not in text and "busy" not in text) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (1.5**attempt) * (1 + random.random()))
    raise AssertionError("unreachable")


def _experiment_id(client) -> str:
    name = os.environ.get(ENV_EXPERIMENT, DEFAULT_EXPERIMENT)
    exp = _retry(client.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    try:
        artifacts = Path(os.environ.get("FRANCA_ARTIFACT_ROOT", "mlartifacts")).resolve().as_uri()
        return _retry(client.create_experiment, name, artifact_location=artifacts)
    except Exception:  # created by a parallel job in the meantime
        return _retry(client.get_experiment_by_name, name).experiment_id


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:_MAX_PARAM_LEN]
    return out


def open_parent_run(tags: Mapping[str, str]) -> str | None:
    """Open the workflow's parent run; returns its id (None when tracking is off)."""
    if not enabled():
        return None
    client = _client()
    run = _retry(client.create_run, _experiment_id(client), tags=dict(tags), run_name=tags.get("run_name"))
    return run.info.run_id


def close_parent_run(run_id: str | None, status: str = "FINISHED") -> None:
    if run_id and enabled():
        _retry(_client().set_terminated, run_id, status)


class Run:
    """A child run of one job: params, buffered step metrics, artifacts, tags; a context manager."""

    def __init__(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str], flush_every: int = 50):
        self.run_id: str | None = None
        self._pending: list = []
        self._flush_every = flush_every
        if not enabled():
            return
        from mlflow.entities import Param

        self._client = _client()
        all_tags = dict(tags)
        parent = os.environ.get(ENV_PARENT)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = _retry(self._client.create_run, _experiment_id(self._client), tags=all_tags, run_name=name)
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in sorted(flatten(params).items())]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            _retry(self._client.log_batch, self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if _is_number(v)]
        if len(self._pending) >= self._flush_every * 10:
            self.flush()

    def flush(self) -> None:
        while self.run_id is not None and self._pending:
            batch, self._pending = self._pending[:1000], self._pending[1000:]
            _retry(self._client.log_batch, self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import RunTag

        _retry(self._client.log_batch, self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_artifact(self, path: str | Path) -> None:
        if self.run_id is not None and Path(path).exists():
            _retry(self._client.log_artifact, self.run_id, str(path))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is None:
            return
        self.flush()
        _retry(self._client.set_terminated, self.run_id, status)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
