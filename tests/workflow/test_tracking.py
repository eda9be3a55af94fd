"""MLflow tracking on a real sqlite store: parent/child linkage, params, metrics, and parallel writers, logging
directly and through the workflow's local tracking server (a real `mlflow server` on 127.0.0.1)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from franca import tracking, tracking_server
from franca.tracking_rest import healthy

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
    monkeypatch.delenv(tracking.ENV_OFF, raising=False)
    return tmp_path


def _mlflow(store) -> MlflowClient:
    return MlflowClient(os.environ[tracking.ENV_URI])


def _start_server(store):
    proc, url = tracking_server.start(store / "mlflow.db", store / "mlartifacts", store / "server.log")
    assert tracking_server.wait_until_healthy(proc, url), (store / "server.log").read_text()[-3000:]
    return proc, url


@pytest.mark.parametrize("via", ["store", "server"])
def test_parent_and_parallel_children(store, via):
    parent = tracking.open_parent_run({"run_name": "wf", "kind": "workflow"})  # creates the store
    env = {**os.environ, tracking.ENV_PARENT: parent}
    server = None
    if via == "server":
        server, url = _start_server(store)
        env.update({tracking.ENV_SERVER: url, tracking.ENV_SERVER_HOST: os.uname().nodename})
    try:
        procs = [
            subprocess.Popen([sys.executable, "-c", CHILD, str(i)], env=env, stdout=subprocess.PIPE, text=True)
            for i in range(4)
        ]
        ids = [p.communicate(timeout=300)[0].strip() for p in procs]
    finally:
        if server is not None:
            tracking_server.stop(server)
    assert all(p.returncode == 0 for p in procs), "a parallel writer failed (database lock?)"
    if via == "server":  # the children wrote through the server, not by importing mlflow
        log = (store / "server.log").read_text()
        assert log.count("POST /api/2.0/mlflow/runs/create") == 4, log[-3000:]  # one run per child
        assert log.count("POST /api/2.0/mlflow/runs/log-batch") >= 4 * 3, log[-3000:]  # params, metrics, tags
        assert server.poll() is not None and not healthy(url)
    tracking.close_parent_run(parent)
    client = _mlflow(store)
    children = client.search_runs(
        [client.get_experiment_by_name("test").experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(r.info.run_id for r in children) == sorted(ids)
    for run in children:
        i = run.data.params["i"]
        assert run.data.params["a.b"] == "1" and run.data.tags["rule"] == "t" and run.data.tags["done"] == "yes"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert len(history) == 300 and min(h.value for h in history) == pytest.approx(1 / 300)
        assert run.info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"note{i}.txt"]
        assert Path(client.download_artifacts(run.info.run_id, f"note{i}.txt", str(store))).read_text() == i


def test_server_stops_when_the_workflow_dies(store):
    """The watchdog stops `mlflow server` (its whole process group) once the process that started it is gone."""
    starter = textwrap.dedent(
        """
        import os
        from pathlib import Path
        from franca import tracking_server
        proc, url = tracking_server.start(Path("mlflow.db"), Path("mlartifacts"), Path("server.log"))
        print(proc.pid, url, tracking_server.wait_until_healthy(proc, url), flush=True)
        os._exit(0)  # as if killed: no stop()
        """
    )
    tracking.open_parent_run({"run_name": "wf"})
    out = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, timeout=180, check=True)
    pgid, url, was_up = out.stdout.split()
    assert was_up == "True", (store / "server.log").read_text()[-3000:]
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            os.killpg(int(pgid), 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.killpg(int(pgid), signal.SIGKILL)
        pytest.fail(f"tracking server group {pgid} still alive 90 s after its starter exited")
    assert not healthy(url)


def test_failed_job_marks_run_failed(store):
    with pytest.raises(RuntimeError):
        with tracking.Run("boom", params={}, tags={}) as run:
            raise RuntimeError("x")
    assert _mlflow(store).get_run(run.run_id).info.status == "FAILED"


def test_flatten():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "{}"}
