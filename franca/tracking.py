"""MLflow tracking: one parent run per workflow invocation, one child run per job, through MLflow's own client.

The workflow's `onstart` opens the parent run and exports its id in `FRANCA_PARENT_RUN_ID`; every `franca` stage
opens a child run tagged `mlflow.parentRunId`. Jobs write `tracking_uri` (`FRANCA_TRACKING_URI`) and nothing else:
by default the sqlite store `mlflow.db` at the repo root, shared by the parallel jobs of a run (MLflow waits up to
20 s on a held lock per statement, `retry` retries a locked store for at most `LOCK_BUDGET_S`); on a cluster, the
URL of an MLflow server the user names. A store that stays locked, or does not answer, does not fail the job: the
run's remaining records go to `<pending>/<uuid>/ops.json` (franca.tracking_pending), uploaded at the workflow's next
start or end.

Artifacts land only under the configured artifact root (`FRANCA_ARTIFACT_ROOT`, default `mlartifacts`): a run whose
artifact URI points elsewhere (an experiment created with another location) is refused with the paths named.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

ENV_URI = "FRANCA_TRACKING_URI"
ENV_EXPERIMENT = "FRANCA_MLFLOW_EXPERIMENT"
ENV_PARENT = "FRANCA_PARENT_RUN_ID"
ENV_OFF = "FRANCA_TRACKING"  # "off" disables tracking (unit tests, quick manual runs)
ENV_ARTIFACTS = "FRANCA_ARTIFACT_ROOT"
ENV_PENDING = "FRANCA_TRACKING_PENDING"  # where runs that could not reach the store leave their records
DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "franca-repro"
# MLflow UI 3.x opens an experiment in its model-training view (runs, metrics) rather than the GenAI view (traces)
# when the experiment carries this tag (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# A locked sqlite store is given up within about a minute: no retry starts later than LOCK_BUDGET_S (env
# FRANCA_TRACKING_LOCK_BUDGET_S) after the first attempt, and one attempt is bounded by MLflow's sqlite busy_timeout
# (20 s per statement) and by _ENGINE_RETRIES engine creations (5 s sqlite timeout each; MLflow's default 10 sleep
# about 100 s in total).
LOCK_BUDGET_S = 30.0
_ENGINE_RETRIES = 3
_SQLITE_LOCK_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}  # primary result codes (low byte)
BATCH_LIMITS = {"params": 100, "tags": 100, "metrics": 1000}  # MLflow's per-request limits of log_batch
_MAX_PARAM_LEN = 6000


class TrackingError(RuntimeError):
    """The tracking store cannot be used as configured; the message names the store, experiment or path."""


def enabled() -> bool:
    return os.environ.get(ENV_OFF, "on").lower() not in ("off", "0", "false")


def tracking_uri() -> str:
    return os.environ.get(ENV_URI, DEFAULT_URI)


def artifact_root() -> Path:
    """Where runs store their artifacts: ``FRANCA_ARTIFACT_ROOT``, default ``mlartifacts`` (relative to the cwd)."""
    return Path(os.environ.get(ENV_ARTIFACTS, "mlartifacts"))


def pending_dir() -> Path:
    return Path(os.environ.get(ENV_PENDING, ".snakemake/franca_tracking_pending"))


def is_lock_error(err: BaseException) -> bool:
    """Whether `err` is, or was caused by, sqlite reporting SQLITE_BUSY / SQLITE_LOCKED (by error code, not text).

    MLflow wraps sqlalchemy's OperationalError (``raise MlflowException(...) from e``), which wraps sqlite3's.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, sqlite3.OperationalError) and (getattr(cur, "sqlite_errorcode", -1) & 0xFF) in (
            _SQLITE_LOCK_CODES
        ):
            return True
        stack += [cur.__cause__, cur.__context__, getattr(cur, "orig", None)]
    return False


def retry(fn: Callable, *args, budget: float | None = None, **kwargs):
    """Call `fn`, retrying while the sqlite store is locked by a parallel job, for at most `budget` seconds."""
    budget = float(os.environ.get("FRANCA_TRACKING_LOCK_BUDGET_S", LOCK_BUDGET_S)) if budget is None else budget
    start = time.monotonic()
    for attempt in range(1_000_000):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            waited = time.monotonic() - start
            if not is_lock_error(err):
                raise
            if waited >= budget:
                raise TrackingError(
                    f"tracking store {tracking_uri()} stayed locked for {waited:.0f} s ({err.__class__.__name__})"
                ) from err
            time.sleep(min(2.0, 0.05 * 1.5**attempt) * (1 + random.random()))
    raise AssertionError("unreachable")


def client():
    """MLflow's client on `tracking_uri` (sqlite: no pooled connection held between calls)."""
    os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    # an unreachable tracking server: 3 retries (2+4+8 s apart) of 10 s at most, not MLflow's default 7 of 120 s
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow.store.db.utils as db_utils
    from mlflow.tracking import MlflowClient

    db_utils.MAX_RETRY_COUNT = min(db_utils.MAX_RETRY_COUNT, _ENGINE_RETRIES)

    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(mlflow, ensure_tags: bool = False) -> str:
    """Id of the workflow's experiment (created under the artifact root when missing); refuses an experiment whose
    artifact location is outside the artifact root. ``ensure_tags`` also sets EXPERIMENT_TAGS on an existing one."""
    name = os.environ.get(ENV_EXPERIMENT, DEFAULT_EXPERIMENT)
    exp = retry(mlflow.get_experiment_by_name, name)
    if exp is None:
        try:
            retry(mlflow.create_experiment, name, artifact_root().resolve().as_uri(), EXPERIMENT_TAGS)
        except TrackingError:
            raise
        except Exception:  # created by a parallel job in the meantime
            pass
        exp = retry(mlflow.get_experiment_by_name, name)
    elif ensure_tags:
        for key, value in EXPERIMENT_TAGS.items():
            if exp.tags.get(key) != value:
                retry(mlflow.set_experiment_tag, exp.experiment_id, key, value)
    check_artifact_uri(exp.artifact_location, f"experiment {name!r}")
    return exp.experiment_id


def check_artifact_uri(uri: str, owner: str) -> None:
    """Refuse artifact URI `uri` unless it lies under the artifact root: a local directory (the default), a URL
    prefix (``FRANCA_ARTIFACT_ROOT=s3://bucket/prefix``), or, with an MLflow server as `tracking_uri`, that
    server's own proxied store (``mlflow-artifacts:``)."""
    parsed, root = urlparse(uri), os.environ.get(ENV_ARTIFACTS, "mlartifacts")
    if parsed.scheme == "mlflow-artifacts":
        ok = tracking_uri().startswith(("http://", "https://"))
    elif "://" in root:
        ok = uri == root or uri.startswith(root.rstrip("/") + "/")
    else:
        local = parsed.scheme in ("file", "") and Path(unquote(parsed.path)).resolve()
        ok = bool(local) and local.is_relative_to(Path(root).resolve())
    if not ok:
        raise TrackingError(
            f"{owner} stores artifacts at {uri}, outside the artifact root {root} ({ENV_ARTIFACTS}); "
            f"use another mlflow_experiment name or point {ENV_ARTIFACTS} at that location"
        )


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
    """Open the workflow's parent run (and tag the experiment for the UI); its id, None when tracking is off."""
    if not enabled():
        return None
    mlflow = retry(client)
    exp = experiment_id(mlflow, ensure_tags=True)
    return retry(mlflow.create_run, exp, tags=dict(tags), run_name=tags.get("run_name")).info.run_id


def close_parent_run(run_id: str | None, status: str = "FINISHED") -> None:
    if run_id and enabled():
        retry(retry(client).set_terminated, run_id, status)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def unreachable(err: BaseException) -> bool:
    """A store that is locked past the budget or does not answer (the job goes on; its records are kept)."""
    if isinstance(err, TrackingError) and is_lock_error(err):
        return True
    cur: BaseException | None = err
    while cur is not None:
        if type(cur).__name__ in ("ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout", "MaxRetryError"):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class Run:
    """A child run of one job: params, buffered step metrics, artifacts, tags; a context manager.

    Every write is one operation ("create", "batch", "artifact", "end"). Once the store is unreachable, this and the
    remaining operations are kept in a pending record (franca.tracking_pending) instead, and the job goes on.
    """

    def __init__(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str], flush_every: int = 50):
        self.run_id: str | None = None
        self.pending = None  # franca.tracking_pending.Pending once the store was unreachable
        self._pending_metrics: list[tuple[str, float, int, int]] = []
        self._flush_every = flush_every
        self._on = enabled()
        if not self._on:
            return
        all_tags = dict(tags)
        if os.environ.get(ENV_PARENT):
            all_tags["mlflow.parentRunId"] = os.environ[ENV_PARENT]
        self._mlflow = None  # created by the first operation: MLflow's client opens the store at once
        self._do("create", {"name": name, "tags": all_tags})
        self._batch("params", sorted(flatten(params).items()))

    def _do(self, op: str, payload: dict) -> None:
        if self.pending is None:
            try:
                return self._send(op, payload)
            except Exception as err:
                if not unreachable(err):
                    raise
                from franca.tracking_pending import Pending

                self.pending = Pending.open(self.run_id, err)
                log.warning("tracking store %s unreachable (%s); records kept in %s", tracking_uri(), err, self.pending)
        self.pending.add(op, payload)

    def _send(self, op: str, payload: dict) -> None:
        if self._mlflow is None:
            self._mlflow = retry(client)
        send(self._mlflow, self, op, payload)

    def _batch(self, kind: str, rows: list) -> None:
        for start in range(0, len(rows), BATCH_LIMITS[kind]):
            self._do("batch", {kind: rows[start : start + BATCH_LIMITS[kind]]})

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self._on:
            return
        now = int(time.time() * 1000)
        self._pending_metrics += [(k, float(v), now, int(step)) for k, v in metrics.items() if _is_number(v)]
        if len(self._pending_metrics) >= self._flush_every * 10:
            self.flush()

    def flush(self) -> None:
        if self._on:
            rows, self._pending_metrics = self._pending_metrics, []
            self._batch("metrics", rows)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self._on:
            self._batch("tags", [(k, str(v)[:5000]) for k, v in tags.items()])

    def log_artifact(self, path: str | Path) -> None:
        if self._on and Path(path).exists():
            self._do("artifact", {"path": str(Path(path).resolve())})

    def end(self, status: str = "FINISHED") -> None:
        if self._on:
            self.flush()
            self._do("end", {"status": status})
            if self.pending is not None:
                self.pending.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")


def send(mlflow, run, op: str, payload: dict) -> None:
    """One operation of a run on the store (`run` has `run_id`, set by "create")."""
    from mlflow.entities import Metric, Param, RunTag

    if op == "create":
        exp = experiment_id(mlflow)
        info = retry(mlflow.create_run, exp, tags=payload["tags"], run_name=payload["name"]).info
        check_artifact_uri(info.artifact_uri, f"run {info.run_id}")
        run.run_id = info.run_id
    elif op == "batch":
        rows = {
            "params": [Param(k, v) for k, v in payload.get("params", [])],
            "metrics": [Metric(k, v, t, s) for k, v, t, s in payload.get("metrics", [])],
            "tags": [RunTag(k, v) for k, v in payload.get("tags", [])],
        }
        retry(mlflow.log_batch, run.run_id, **rows)
    elif op == "artifact":
        check_artifact_uri(retry(mlflow.get_run, run.run_id).info.artifact_uri, f"run {run.run_id}")
        retry(mlflow.log_artifact, run.run_id, payload["path"])
    elif op == "end":
        retry(mlflow.set_terminated, run.run_id, payload["status"])
    else:
        raise ValueError(f"unknown tracking operation {op!r}")
