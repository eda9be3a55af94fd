"""A loopback image server for the work-unit tests (tests/workflow/test_units.py, tests/cluster/test_units_slurm.py).

Routes (``<i>`` any integer): ``/img/<i>.png`` a small PNG drawn from ``i`` (distinct images, same bytes on every
request), ``/slow/<i>.png`` the same after ``slow_s`` seconds, ``/gone/<i>`` 404, ``/outage/<i>.png`` 503 while
``outage`` is set or while that path has had at most ``outage_requests`` requests (an outage that ends by itself, say
between a unit's failed run and its retry), else the image. ``/first/<i>.png`` is the image, slow like ``/slow/`` when
``i // group_rows`` is the group of the first ``/first/`` request the server received (``slow_group``): the unit
whose job reached the server first becomes the slow one. Every request path is appended to ``log`` (thread-safe), so
that a test can ask which URLs a run requested.
"""

from __future__ import annotations

import io
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def image_bytes(i: int, size: int = 16) -> bytes:
    """A ``size`` x ``size`` RGB PNG whose pixels depend on ``i`` (distinct pHash-wise only by luck; bytes unique)."""
    seed = zlib.crc32(str(i).encode())
    pixels = bytes(((seed >> (8 * (k % 3))) + 37 * k) & 0xFF for k in range(size * size * 3))
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(buf, format="PNG")
    return buf.getvalue()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


class UrlServer:
    def __init__(self, slow_s: float = 0.5, outage_requests: int = 0, group_rows: int = 1):
        self.slow_s, self.outage, self.outage_requests = slow_s, False, outage_requests
        self.group_rows, self.slow_group = group_rows, None
        self.log: list[str] = []
        self.hits: Counter[str] = Counter()  # requests per path since the start (clear() keeps it)
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def handle(self):  # a client that hung up (a killed fetch) is not an error of the server
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                kind, _, name = self.path.strip("/").partition("/")
                number = name.split(".")[0]
                with owner.lock:
                    owner.log.append(self.path)
                    owner.hits[self.path] += 1
                    hit = owner.hits[self.path]
                    if kind == "first" and number.isdigit() and owner.slow_group is None:
                        owner.slow_group = int(number) // owner.group_rows
                if kind == "gone" or not number.isdigit() or kind not in ("img", "slow", "outage", "first"):
                    return self._send(404, b"gone")
                if kind == "outage" and (owner.outage or hit <= owner.outage_requests):
                    return self._send(503, b"try later")
                if kind == "slow" or (kind == "first" and int(number) // owner.group_rows == owner.slow_group):
                    time.sleep(owner.slow_s)
                self._send(200, image_bytes(int(number)), "image/png")

            def _send(self, code, body, ctype="text/plain"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def requested(self) -> list[str]:
        with self.lock:
            return list(self.log)

    def clear(self) -> None:
        with self.lock:
            self.log.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
