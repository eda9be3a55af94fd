"""Helpers of the data tests: a hostile image server on 127.0.0.1 and small generated photo-like images.

A named module (tests/ is on the path), so that test files import it by a name no other conftest.py shadows."""

from __future__ import annotations

import functools
import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from franca.data.synthetic import pink_noise


def photo_like(rng: np.random.Generator, n: int, size: int = 96) -> list[Image.Image]:
    """Colour 1/f-noise images with a few random blobs: natural-image-like spectra, all distinct."""
    fields = pink_noise(rng, 3 * n, size, exponent=1.3).reshape(n, 3, size, size)
    yy, xx = np.mgrid[0:size, 0:size]
    images = []
    for i in range(n):
        rgb = np.moveaxis(fields[i], 0, -1) * 0.7
        for _ in range(3):
            cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.08, 0.25) * size
            blob = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r**2)[..., None]
            rgb = np.where(blob, rng.uniform(0, 1, 3) * 0.5 + rgb * 0.5, rgb)
        images.append(Image.fromarray(np.clip(rgb * 255, 0, 255).astype(np.uint8)))
    return images


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height grey pixels, with a tiny (invalid-length) IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
    )


@functools.lru_cache(maxsize=2)
def gzip_zeros(megabytes: int) -> bytes:
    """A gzip stream of ``megabytes`` MiB of zero bytes (about 1 KiB per MiB), made chunk by chunk."""
    z, chunk = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS), bytes(2**20)
    return b"".join(z.compress(chunk) for _ in range(megabytes)) + z.flush()


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default listen backlog of 5 drops connections under concurrent clients


class ImageServer:
    """Routes: /img/<name> (served bytes), /flaky/<name> (500 once per name, then the image), /always500, /404,
    /slow/<name> (sleeps ``slow_s`` before answering), /truncated.jpg, /page.html, /bomb.png, /large.bin,
    /loop (redirects to itself), /redirect/<name> (302 to /img/<name>), /short.jpg (a body shorter than its
    Content-Length, then the connection closes), /gzip-bomb (a gzip Content-Encoding body that inflates to
    ``bomb_mb`` MB of zeros), /to-metadata (302 to the cloud metadata address 169.254.169.254), /status/<code>
    (that HTTP status), /outage/<name> (503 while ``outage`` is set, else the image), /dead/<n> (never answers:
    waits until ``release`` is set or ``dead_s``). The User-Agent of every request is recorded in ``agents``."""

    def __init__(self, images: dict[str, bytes], slow_s: float = 2.0):
        self.images, self.slow_s = images, slow_s
        self.truncated = next(iter(images.values()))[:-400]
        self.hits: dict[str, int] = {}
        self.agents: list[str] = []
        self.bomb_mb = 300
        self.outage, self.release, self.dead_s = False, threading.Event(), 60.0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                return

            def do_GET(self):  # noqa: N802 (http.server API)
                server.route(self)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # clients that time out close their sockets
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self.lock:
            self.hits.clear()

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    @staticmethod
    def send(handler, code: int, body: bytes = b"", ctype: str = "image/jpeg", headers: dict | None = None) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(body)

    def route(self, h) -> None:
        path = h.path
        with self.lock:
            self.hits[path] = self.hits.get(path, 0) + 1
            hits = self.hits[path]
            self.agents.append(h.headers.get("User-Agent", ""))
        name = path.rsplit("/", 1)[-1]
        if path.startswith("/img/") and name in self.images:
            self.send(h, 200, self.images[name])
        elif path.startswith("/flaky/") and name in self.images:
            self.send(h, 500, b"oops", "text/plain") if hits == 1 else self.send(h, 200, self.images[name])
        elif path.startswith("/slow/") and name in self.images:
            time.sleep(self.slow_s)
            self.send(h, 200, self.images[name])
        elif path.startswith("/redirect/"):
            self.send(h, 302, b"", "text/plain", {"Location": f"/img/{name}"})
        elif path == "/loop":
            self.send(h, 302, b"", "text/plain", {"Location": "/loop"})
        elif path.startswith("/status/"):
            self.send(h, int(name), b"status", "text/plain")
        elif path.startswith("/outage/") and name in self.images:
            self.send(h, 503, b"down", "text/plain") if self.outage else self.send(h, 200, self.images[name])
        elif path.startswith("/dead/"):
            self.release.wait(self.dead_s)
        elif path == "/always500":
            self.send(h, 500, b"down", "text/plain")
        elif path == "/truncated.jpg":
            self.send(h, 200, self.truncated)
        elif path == "/page.html":
            self.send(h, 200, b"<!doctype html><html><body>not an image</body></html>", "text/html")
        elif path == "/bomb.png":
            self.send(h, 200, png_bomb(), "image/png")
        elif path == "/large.bin":
            self.send(h, 200, b"\xff" * 300_000)
        elif path == "/short.jpg":
            body = next(iter(self.images.values()))
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(body) + 5000))
            h.end_headers()
            h.wfile.write(body)
            h.close_connection = True
        elif path == "/gzip-bomb":
            self.send(h, 200, gzip_zeros(self.bomb_mb), "image/png", {"Content-Encoding": "gzip"})
        elif path == "/to-metadata":
            self.send(h, 302, b"", "text/plain", {"Location": "http://169.254.169.254/latest/meta-data/"})
        else:
            self.send(h, 404, b"not found", "text/plain")

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
