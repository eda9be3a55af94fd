"""Helper processes of a workflow run (the MLflow server, the fork server): liveness and shutdown of a session.

Both servers are started with ``start_new_session=True``, so the process group of the started process holds
everything it started that did not move to a group of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_session(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group led by ``proc`` and wait until every member is gone; SIGKILL after ``timeout``.

    Waiting for the group, not only for ``proc``: a member (uvicorn under the MLflow watchdog) can still be
    finishing its requests after the leader exited.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while _group_alive(proc.pid) and time.time() < deadline:
        proc.poll()  # reap the leader, our child: a zombie still counts as a member of its group
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
