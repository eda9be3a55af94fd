"""MLflow tracking: one parent run per workflow invocation, one child run per job.

The workflow's `onstart` opens the parent run and exports its id in `FRANCA_PARENT_RUN_ID`; every `franca` stage
opens a child run tagged `mlflow.parentRunId`. The default store is `sqlite:///mlflow.db` at the repo root. Parallel
jobs share that sqlite file, so every write goes through `_retry` (sqlite answers "database is locked" while another
process writes) and step metrics are buffered and sent with `log_batch`. While the workflow runs, jobs on its host
log through its local tracking server (``FRANCA_TRACKING_SERVER``, franca.tracking_rest) instead of importing mlflow.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_URI = "FRANCA_TRACKING_URI"
ENV_EXPERIMENT = "FRANCA_MLFLOW_EXPERIMENT"
ENV_PARENT = "FRANCA_PARENT_RUN_ID"
ENV_OFF = "FRANCA_TRACKING"  # "off" disables tracking (unit tests, quick manual runs)
ENV_SERVER = "FRANCA_TRACKING_SERVER"  # http://127.0.0.1:<port> of the workflow's local server (workflow_hooks)
ENV_SERVER_HOST = "FRANCA_TRACKING_SERVER_HOST"  # the host it runs on: jobs elsewhere use FRANCA_TRACKING_URI
DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "franca-repro"
_MAX_PARAM_LEN = 6000


def enabled() -> bool:
    return os.environ.get(ENV_OFF, "on").lower() not in ("off", "0", "false")


def _client():
    """The REST client of the workflow's local tracking server when it runs on this host and answers, else an mlflow
    client on ``FRANCA_TRACKING_URI`` (manual runs, SLURM jobs on other hosts, a server still starting)."""
    server = os.environ.get(ENV_SERVER)
    if server and os.environ.get(ENV_SERVER_HOST) == socket.gethostname():
        from franca.tracking_rest import RestClient, healthy

        if healthy(server, timeout=5.0):  # a busy single-worker server can take seconds to answer
            return RestClient(server)
    return _MlflowClient(os.environ.get(ENV_URI, DEFAULT_URI))


class _MlflowClient:
    """mlflow's client behind the interface of franca.tracking_rest.RestClient (plain tuples, ids as strings)."""

    def __init__(self, uri: str):
        os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")  # no pooled connections held by jobs
        from mlflow.tracking import MlflowClient

        self._mlflow = MlflowClient(tracking_uri=uri)

    def experiment_id(self, name: str, artifact_location: str) -> str:
        exp = self._mlflow.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self._mlflow.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # created by a parallel job in the meantime
            return self._mlflow.get_experiment_by_name(name).experiment_id

    def create_run(self, experiment_id: str, tags: dict[str, str], run_name: str | None) -> tuple[str, str]:
        info = self._mlflow.create_run(experiment_id, tags=tags, run_name=run_name).info
        return info.run_id, info.artifact_uri

    def log_batch(self, run_id: str, params=(), metrics=(), tags=()) -> None:
        from mlflow.entities import Metric, Param, RunTag

        from franca.tracking_rest import BATCH_LIMITS

        items = {
            "params": [Param(k, v) for k, v in params],
            "metrics": [Metric(k, v, t, s) for k, v, t, s in metrics],
            "tags": [RunTag(k, v) for k, v in tags],
        }
        for kind, rows in items.items():
            for start in range(0, len(rows), BATCH_LIMITS[kind]):
                self._mlflow.log_batch(run_id, **{kind: rows[start : start + BATCH_LIMITS[kind]]})

    def log_artifact(self, run_id: str, artifact_uri: str, path: str | Path) -> None:
        self._mlflow.log_artifact(run_id, str(path))

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        self._mlflow.set_terminated(run_id, status)


def _retry(fn: Callable, *args, attempts: int = 30, **kwargs):
    """Call `fn`, retrying while sqlite reports a lock held by a parallel job (directly or through the server)."""
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
    return _retry(client.experiment_id, name, artifact_root().resolve().as_uri())


def artifact_root() -> Path:
    """Where runs store their artifacts: ``FRANCA_ARTIFACT_ROOT``, default ``mlartifacts`` (relative to the cwd)."""
    return Path(os.environ.get("FRANCA_ARTIFACT_ROOT", "mlartifacts"))


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
    run_id, _ = _retry(client.create_run, _experiment_id(client), dict(tags), tags.get("run_name"))
    return run_id


def close_parent_run(run_id: str | None, status: str = "FINISHED") -> None:
    if run_id and enabled():
        _retry(_client().set_terminated, run_id, status)


class Run:
    """A child run of one job: params, buffered step metrics, artifacts, tags; a context manager."""

    def __init__(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str], flush_every: int = 50):
        self.run_id: str | None = None
        self._pending: list[tuple[str, float, int, int]] = []
        self._flush_every = flush_every
        if not enabled():
            return
        self._client = _client()
        all_tags = dict(tags)
        parent = os.environ.get(ENV_PARENT)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        self.run_id, self._artifact_uri = _retry(self._client.create_run, _experiment_id(self._client), all_tags, name)
        _retry(self._client.log_batch, self.run_id, params=sorted(flatten(params).items()))

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        self._pending += [(k, float(v), now, int(step)) for k, v in metrics.items() if _is_number(v)]
        if len(self._pending) >= self._flush_every * 10:
            self.flush()

    def flush(self) -> None:
        while self.run_id is not None and self._pending:
            batch, self._pending = self._pending[:1000], self._pending[1000:]
            _retry(self._client.log_batch, self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.run_id is not None:
            _retry(self._client.log_batch, self.run_id, tags=[(k, str(v)[:5000]) for k, v in tags.items()])

    def log_artifact(self, path: str | Path) -> None:
        if self.run_id is not None and Path(path).exists():
            _retry(self._client.log_artifact, self.run_id, self._artifact_uri, path)

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
