"""MLflow tracking on a real sqlite store: parent/child linkage, params, metrics, and parallel writers."""

import os
import subprocess
import sys
import textwrap

import pytest

from franca import tracking

CHILD = textwrap.dedent(
    """
    import sys
    from franca import tracking
    with tracking.Run(f"job{sys.argv[1]}", params={"a": {"b": 1}, "i": sys.argv[1]}, tags={"rule": "t"}) as run:
        for step in range(300):
            run.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
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


def test_parent_and_parallel_children(store):
    parent = tracking.open_parent_run({"run_name": "wf", "kind": "workflow"})
    env = {**os.environ, tracking.ENV_PARENT: parent}
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(i)], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    ids = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), "a parallel writer failed (database lock?)"
    tracking.close_parent_run(parent)
    client = tracking._client()
    children = client.search_runs(
        [client.get_experiment_by_name("test").experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(r.info.run_id for r in children) == sorted(ids)
    for run in children:
        assert run.data.params["a.b"] == "1" and run.data.tags["rule"] == "t"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert len(history) == 300 and min(h.value for h in history) == pytest.approx(1 / 300)
        assert run.info.status == "FINISHED"


def test_failed_job_marks_run_failed(store):
    with pytest.raises(RuntimeError):
        with tracking.Run("boom", params={}, tags={}) as run:
            raise RuntimeError("x")
    assert tracking._client().get_run(run.run_id).info.status == "FAILED"


def test_flatten():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "{}"}
