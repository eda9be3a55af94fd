"""MLflow tracking on a real sqlite store through MLflow's client: parent/child linkage, params, metrics, parallel
writers, a locked store (bounded wait, records kept and uploaded later), the artifact root, the experiment's kind,
and no data sent to a port the workflow did not name."""

import http.server
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from franca import tracking

CHILD = textwrap.dedent(
    """
    import sys
    from franca import tracking
    from pathlib import Path
    with tracking.Run(f"job{sys.argv[1]}", params={"a": {"b": 1}, "i": sys.argv[1]}, tags={"rule": "t"}) as run:
        for step in range(300):
            run.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
        Path(f"note{sys.argv[1]}.txt").write_text(sys.argv[1])
        run.log_artifact(f"note{sys.argv[1]}.txt")
        run.set_tags({"done": "yes"})
    print(run.run_id)
    """
)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(tracking.ENV_URI, f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv(tracking.ENV_EXPERIMENT, "test")
    monkeypatch.setenv("FRANCA_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("FRANCA_TRACKING_PENDING", str(tmp_path / "pending"))
    monkeypatch.delenv(tracking.ENV_OFF, raising=False)
    monkeypatch.delenv(tracking.ENV_PARENT, raising=False)
    return tmp_path


def _mlflow() -> MlflowClient:
    return MlflowClient(os.environ[tracking.ENV_URI])


def _children(client: MlflowClient, parent: str):
    exp = client.get_experiment_by_name("test").experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def _child(i: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(i)], env=env, stdout=subprocess.PIPE, text=True)


def test_parent_and_parallel_children(store):
    parent = tracking.open_parent_run({"run_name": "wf", "kind": "workflow"})  # creates the store
    env = {**os.environ, tracking.ENV_PARENT: parent}
    procs = [_child(i, env) for i in range(4)]
    ids = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), "a parallel writer failed (database lock?)"
    assert not (store / "pending").exists(), "a writer gave up on the store"
    tracking.close_parent_run(parent)
    client = _mlflow()
    children = _children(client, parent)
    assert sorted(r.info.run_id for r in children) == sorted(ids)
    for run in children:
        i = run.data.params["i"]
        assert run.data.params["a.b"] == "1" and run.data.tags["rule"] == "t" and run.data.tags["done"] == "yes"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert len(history) == 300 and min(h.value for h in history) == pytest.approx(1 / 300)
        assert run.info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"note{i}.txt"]
        local = Path(client.download_artifacts(run.info.run_id, f"note{i}.txt", str(store)))
        assert local.read_text() == i
        assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())


def test_experiment_opens_in_model_training_view(store):
    """MLflow UI 3.x shows runs (not GenAI traces) for an experiment tagged
    mlflow.experimentKind=custom_model_development: a new one, and one an older workflow created without the tag."""
    tracking.open_parent_run({"run_name": "wf"})
    assert _mlflow().get_experiment_by_name("test").tags["mlflow.experimentKind"] == "custom_model_development"
    os.environ[tracking.ENV_EXPERIMENT] = "old"
    _mlflow().create_experiment("old", artifact_location=(store / "mlartifacts").as_uri())
    tracking.open_parent_run({"run_name": "wf"})
    assert _mlflow().get_experiment_by_name("old").tags["mlflow.experimentKind"] == "custom_model_development"


def test_artifacts_only_under_the_artifact_root(store):
    """An experiment whose artifact location lies elsewhere is refused before anything is written there."""
    elsewhere = store / "elsewhere"
    _mlflow().create_experiment("test", artifact_location=elsewhere.as_uri())
    Path("note.txt").write_text("x")
    with pytest.raises(tracking.TrackingError, match="outside the artifact root") as err:
        with tracking.Run("job", params={}, tags={}) as run:
            run.log_artifact("note.txt")
    assert str(elsewhere) in str(err.value) and "FRANCA_ARTIFACT_ROOT" in str(err.value)
    assert not elsewhere.exists()


def test_lock_is_recognised_by_sqlite_code_not_by_text(store):
    calls = []

    def busy_text():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device or resource busy")  # not a sqlite lock: no retry
        return "retried"

    with pytest.raises(RuntimeError, match="resource busy"):
        tracking.retry(busy_text)
    assert len(calls) == 1
    db = sqlite3.connect(store / "lock.db", timeout=0)
    db.execute("create table t (x)")
    db.execute("begin exclusive")
    try:
        sqlite3.connect(store / "lock.db", timeout=0).execute("select * from t")
    except sqlite3.OperationalError as err:  # "database is locked": SQLITE_BUSY
        assert not tracking.is_lock_error(RuntimeError("database is locked"))  # text alone is not a lock
        wrapped = RuntimeError("store error")
        wrapped.__cause__ = err
        assert tracking.is_lock_error(wrapped)
    else:
        pytest.fail("the exclusive lock did not block a reader")
    finally:
        db.rollback()


def test_locked_store_gives_up_within_budget_then_syncs(store):
    """A store held locked by another process: the job waits a bounded time, keeps its records and succeeds; the
    records reach the store once it is free (what the workflow's hooks do)."""
    from franca.tracking_pending import sync_pending

    parent = tracking.open_parent_run({"run_name": "wf"})
    holder = sqlite3.connect(store / "mlflow.db", timeout=0, isolation_level=None)
    holder.execute("begin exclusive")
    env = {**os.environ, tracking.ENV_PARENT: parent, "FRANCA_TRACKING_LOCK_BUDGET_S": "1"}
    started = time.time()
    try:
        proc = _child(7, env)
        out, _ = proc.communicate(timeout=150)
    finally:
        holder.execute("rollback")
        holder.close()
    elapsed = time.time() - started
    assert proc.returncode == 0
    assert elapsed < 90, f"the job waited {elapsed:.0f} s on a locked store"
    assert len(list((store / "pending").glob("*/ops.json"))) == 1
    assert sync_pending() == 0 and not list((store / "pending").glob("*/ops.json"))
    (run,) = _children(_mlflow(), parent)
    assert run.data.params["i"] == "7" and run.data.tags["done"] == "yes" and run.info.status == "FINISHED"
    assert len(_mlflow().get_metric_history(run.info.run_id, "loss")) == 300
    assert [a.path for a in _mlflow().list_artifacts(run.info.run_id)] == ["note7.txt"]


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Any port on this host: answers 200 to everything (a /health check included) and records what it gets."""

    seen: list[str] = []

    def _answer(self):
        type(self).seen.append(f"{self.command} {self.path}")
        body = b'{"status": "OK"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args):
        pass


def test_job_sends_nothing_to_a_port_it_was_not_given(store):
    """Only `tracking_uri` is written: a server on a port named by the environment the old jobs followed
    (FRANCA_TRACKING_SERVER) gets no request, even though it answers /health."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    env = {**os.environ, "FRANCA_TRACKING_SERVER": url, "FRANCA_TRACKING_SERVER_HOST": socket.gethostname()}
    try:
        tracking.open_parent_run({"run_name": "wf"})
        proc = _child(3, env)
        run_id = proc.communicate(timeout=150)[0].strip()
    finally:
        server.shutdown()
    assert proc.returncode == 0 and _Recorder.seen == []
    assert _mlflow().get_run(run_id).data.params["i"] == "3"


def test_failed_job_marks_run_failed(store):
    with pytest.raises(RuntimeError):
        with tracking.Run("boom", params={}, tags={}) as run:
            raise RuntimeError("x")
    assert _mlflow().get_run(run.run_id).info.status == "FAILED"


def test_flatten():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "{}"}
