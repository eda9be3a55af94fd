"""Warm starts for the jobs of a local workflow run: a fork server that imports torch and the stages once.

Every job of a local run is a `franca` process, and importing torch, torch._dynamo (pulled in by the first
optimizer), torchvision, sklearn and the stage modules costs 3-7 CPU-s per process: more than many tiny jobs
compute. The workflow's onstart hook (franca.workflow_hooks) starts one server per invocation; `franca` then asks it
for a child: the server forks, and the child runs ``franca.cli.main`` with the caller's argv, working directory,
environment, umask and stdin/stdout/stderr (sent as file descriptors), from the RNG states of a fresh interpreter.
The caller waits and exits with the child's status; when the caller dies (Snakemake cancels a job), the server kills
the child's process group. `franca` runs in-process instead whenever the server cannot serve: no server, another
host, a SLURM job (it must run inside its allocation) or a torchrun worker.

The server is one thread (fork is only safe from a single-threaded process): a select loop over the listening
socket and the callers' connections, reaping children without blocking. Protocol (SOCK_SEQPACKET, one message
each way): request = JSON {argv, cwd, env, umask} + 3 file descriptors; reply = the exit status as 4 bytes.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import io
import json
import logging
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from franca.sessions import process_alive, stop_session

log = logging.getLogger(__name__)

ENV_SOCKET = "FRANCA_FORKSERVER"
ENV_HOST = "FRANCA_FORKSERVER_HOST"
# processes that must not be forked from the server: SLURM jobs (their allocation), torchrun workers
_IN_PROCESS_MARKERS = ("SLURM_JOB_ID", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
PRELOAD = (
    "torch",
    "torch._dynamo",  # imported by the first torch.optim optimizer (~2 s)
    "torchvision",
    "numpy",
    "PIL.Image",
    "franca.cli",
    "franca.stages.data",
    "franca.stages.train",
    "franca.stages.evaluate",
    "franca.stages.paper",
    "franca.train.loop",
    "franca.eval.run",
    "franca.rasa.train",
    "franca.tracking_rest",
    "sklearn.linear_model",
)
_REQUEST_MAX = 1 << 20
_STATUS = struct.Struct("!i")
_REFUSED = -1  # the reply when the server could not fork: the caller runs the command itself
_TORCH_DEFAULT_SEED = 67280421310721  # torch's default CPU generator seed in a fresh interpreter


# ---------------------------------------------------------------------------------------------------- the caller


def _socket_path() -> str | None:
    path = os.environ.get(ENV_SOCKET)
    if not path or any(k in os.environ for k in _IN_PROCESS_MARKERS):
        return None
    if os.environ.get(ENV_HOST, socket.gethostname()) != socket.gethostname():
        return None
    return path


def run_remote(argv: list[str]) -> int | None:
    """Run ``franca argv`` in a child of the server; its exit status, or None when the server cannot serve."""
    path = _socket_path()
    if path is None:
        return None
    if not all(_is_open(fd) for fd in (0, 1, 2)):
        return None  # a closed stdin/stdout/stderr: the socket would take its number and be sent in its place
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except (OSError, AttributeError):
        return None  # no SOCK_SEQPACKET unix sockets on this system (macOS): run in-process
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None  # no server (not started yet, or stopped): run in-process
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask()}
    with sock:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:  # one atomic message: when it fails (an environment over the socket buffer, say), nothing ran
            socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
        except OSError:
            return None
        try:
            reply = sock.recv(_STATUS.size)
        except OSError:
            reply = b""
    if len(reply) == _STATUS.size and _STATUS.unpack(reply)[0] == _REFUSED:
        return None  # the server could not fork: nothing ran
    if len(reply) != _STATUS.size:
        print(f"franca: the fork server at {path} stopped before `franca {' '.join(argv)}` finished", file=sys.stderr)
        return 1
    return _STATUS.unpack(reply)[0]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------- the child


def _exec_child(request: dict, fds: list[int], inherited: list[int]) -> None:
    """In the forked child: become a fresh `franca` process for ``request``, run it, exit (never returns)."""
    code = 1
    try:
        # own process group (the parent sets it too, so a kill right after fork reaches it): the server kills the
        # group as a whole, DataLoader workers included. SIGTERM stays blocked until the handlers are reset.
        os.setpgid(0, 0)
        for fd in inherited:
            with contextlib.suppress(OSError):
                os.close(fd)
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        _fresh_interpreter_state(request)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        from franca.cli import main

        code = _run_main(main, request["argv"])
    except BaseException:
        traceback.print_exc()  # the set-up failed (a cwd that no longer exists, say)
    finally:
        with contextlib.suppress(Exception):
            threading._shutdown()  # join non-daemon threads, as interpreter shutdown does
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _fresh_interpreter_state(request: dict) -> None:
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.umask(int(request["umask"]))
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["franca", *request["argv"]]
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=os.isatty(1))
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, errors="backslashreplace")
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    tempfile.tempdir = None  # re-read TMPDIR (Snakemake sets one per job)
    root = logging.getLogger()
    for handler in list(root.handlers):  # the server's handlers; main() configures its own
        root.removeHandler(handler)
    random.seed()  # what an interpreter start draws: fresh entropy for random and numpy, torch's fixed default
    import numpy
    import torch

    numpy.random.seed()
    torch.manual_seed(_TORCH_DEFAULT_SEED)
    _apply_thread_env()


def _apply_thread_env() -> None:
    """Thread pools sized from the caller's OMP_NUM_THREADS (Snakemake sets it to the rule's threads), as a fresh
    process sizes them when it loads torch, OpenBLAS and OpenMP; the server loaded them with its own environment."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return
    if n > 0:
        from franca.stages.common import limit_threads

        limit_threads(n)


def _run_main(main, argv: list[str]) -> int:
    """``sys.exit(main(argv))`` as the interpreter would report it: SystemExit codes, tracebacks as exit 1."""
    try:
        return int(main(argv) or 0)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
        return 1


# ---------------------------------------------------------------------------------------------------- the server


class Server:
    """Accept requests, fork one child each, reply with its exit status; kill it if its caller goes away."""

    def __init__(self, path: str, parent_pid: int | None = None) -> None:
        self.path = path
        self.parent_pid = parent_pid
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(64)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.children: dict[int, socket.socket] = {}  # child pid -> its caller's connection
        self.stopping = False

    def serve(self) -> None:
        last_check = time.monotonic()
        try:
            while not self.stopping:
                for key, _ in self.selector.select(timeout=0.05):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        self._caller_gone(key.fileobj)
                self._reap()
                if time.monotonic() - last_check > 1.0:
                    last_check = time.monotonic()
                    if self.parent_pid and not process_alive(self.parent_pid):
                        log.info("workflow process %d is gone: stopping", self.parent_pid)
                        break
        finally:
            self.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:  # out of file descriptors, say: the caller runs in-process
            log.error("accept: %s", exc)
            return
        fds: list[int] = []
        try:
            conn.settimeout(5.0)  # a caller stopped between connect and send must not stall the server
            data, fds, _, _ = socket.recv_fds(conn, _REQUEST_MAX, 3)
            request = json.loads(data)
            if len(fds) != 3:
                raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
        except (OSError, ValueError) as exc:
            log.error("bad request: %s", exc)
            _close_all(fds)
            conn.close()
            return
        inherited = [self.listener.fileno(), self.selector.fileno(), conn.fileno()]
        inherited += [c.fileno() for c in self.children.values()]
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            pid = os.fork()
        except OSError as exc:
            log.error("fork: %s", exc)
            pid = None
        if pid == 0:
            _exec_child(request, fds, inherited)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        _close_all(fds)
        if pid is None:
            with contextlib.suppress(OSError):
                conn.send(_STATUS.pack(_REFUSED))
            conn.close()
            return
        with contextlib.suppress(OSError):  # the child may have done it already
            os.setpgid(pid, pid)
        self.children[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ)
        log.info("pid %d: franca %s", pid, " ".join(request["argv"]))

    def _caller_gone(self, conn: socket.socket) -> None:
        """The caller closed its end before the reply (killed): stop its child and all the child started."""
        pid = next((p for p, c in self.children.items() if c is conn), None)
        self.selector.unregister(conn)
        if pid is not None:
            log.info("pid %d: caller gone, killing its process group", pid)
            _kill_group(pid)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + n
            with contextlib.suppress(OSError):
                conn.send(_STATUS.pack(code))
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn)
            conn.close()
            log.info(
                "pid %d: exit %d (cpu user %.1f s, sys %.1f s; max rss %d MB; page faults %d minor, %d major)",
                pid, code, usage.ru_utime, usage.ru_stime, usage.ru_maxrss // 1024, usage.ru_minflt, usage.ru_majflt,
            )  # fmt: skip

    def close(self) -> None:
        for pid in list(self.children):
            _kill_group(pid)
        deadline = time.monotonic() + 10
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for pid in list(self.children):  # no child outlives the server
            _kill_group(pid, signal.SIGKILL)
        self._reap()
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.path))


def _kill_group(pid: int, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def preload(modules=PRELOAD) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # a missing optional module only costs its import in the jobs that need it
            log.warning("preload %s: %s", name, exc)
    gc.collect()
    gc.freeze()  # keep the preloaded objects out of the children's collections (fewer copy-on-write pages)


# ---------------------------------------------------------------------------------------------------- lifecycle


def start(log_file: Path) -> tuple[subprocess.Popen, str]:
    """Start a server for this process's jobs (a private socket directory); returns (process, socket path).

    The server binds its socket once its imports are done; jobs started before that run in-process.
    """
    path = os.path.join(tempfile.mkdtemp(prefix="franca-fork-"), "sock")  # mode 0700: only this user connects
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "franca.forkserver", "--socket", path, "--parent-pid", str(os.getpid())]
    with log_file.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    return proc, path


def stop(proc: subprocess.Popen, path: str, timeout: float = 20.0) -> None:
    """Stop the server (it stops its children first); remove its socket if it could not."""
    stop_session(proc, timeout)
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True, help="path of the unix socket to serve on")
    ap.add_argument("--parent-pid", type=int, default=None, help="stop when this process is gone")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s forkserver %(message)s", stream=sys.stderr)
    started = time.time()
    preload()
    server = Server(args.socket, args.parent_pid)

    def stop_serving(signum, frame):
        server.stopping = True

    signal.signal(signal.SIGTERM, stop_serving)
    signal.signal(signal.SIGINT, stop_serving)
    log.info("serving on %s (imports took %.1f s)", args.socket, time.time() - started)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
