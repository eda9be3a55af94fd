"""Fetch throughput against a loopback image server (issue 4 "Done when": fetch throughput on loopback).

Serves ``--n`` generated JPEGs (``--size`` px, quality 90) from a threaded HTTP server on 127.0.0.1, fetches them
with ``franca.data.fetch.fetch_urls`` (decode check on, re-encoding off unless ``--resize``), then the shard stage
(``canonicalise``: sha256, pHash, colour layout) and reports URLs/s, MB/s and images/s:

    .venv/bin/python benchmarks/bench_fetch.py --n 2000 --concurrency 32

Prints one JSON object. The loopback server shares the CPU with the client, so this bounds the client's overhead
(decode check, tar writing), not a network.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing as mp
import platform
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from franca.data.fetch import fetch_urls
from franca.data.manifest import canonicalise
from franca.data.synthetic import pink_noise


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def _serve_forever(images: list[bytes], port_queue) -> None:
    """Runs in its own process, so that the server does not compete with the client for the GIL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real image hosts

        def log_message(self, *args):
            return

        def do_GET(self):  # noqa: N802 (http.server API)
            body = images[int(self.path.rsplit("/", 1)[-1].split(".")[0]) % len(images)]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = _Server(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    server.serve_forever()


def serve(images: list[bytes]) -> tuple[mp.Process, str]:
    queue = mp.get_context("fork").Queue()
    process = mp.get_context("fork").Process(target=_serve_forever, args=(images, queue), daemon=True)
    process.start()
    return process, f"http://127.0.0.1:{queue.get(timeout=30)}"


def make_images(n_distinct: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    fields = pink_noise(rng, 3 * n_distinct, size).reshape(n_distinct, 3, size, size)
    out = []
    for f in fields:
        buf = io.BytesIO()
        Image.fromarray((np.moveaxis(f, 0, -1) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--resize", type=int, default=None, help="resize_max_side (re-encodes resized images)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    images = make_images(64, args.size)
    server, base = serve(images)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "urls.parquet"
        pd.DataFrame({"url": [f"{base}/img/{i}.jpg" for i in range(args.n)], "caption": "x"}).to_parquet(table)
        reencode = "if_resized" if args.resize else "never"
        report = fetch_urls(
            table, Path(tmp) / "raw", shard_size=args.shard_size, concurrency=args.concurrency, timeout=30,
            resize_max_side=args.resize, reencode=reencode, allow_private_addresses=True,  # the 127.0.0.1 server
        )  # fmt: skip
        start = time.perf_counter()
        shard = canonicalise([Path(tmp) / "raw"], Path(tmp) / "ds")
        shard_s = time.perf_counter() - start
    server.terminate()
    server.join()
    result = {
        "benchmark": "fetch_loopback",
        "platform": platform.platform(),
        "n_urls": args.n,
        "image_px": args.size,
        "mean_kb": float(np.mean([len(b) for b in images]) / 1e3),
        "concurrency": args.concurrency,
        "success": report["success"],
        "failed": report["failed"],
        "fetch_urls_per_s": report["this_run"]["urls_per_s"],
        "fetch_mb_per_s": report["this_run"]["mb_per_s"],
        "shard_stage_images_per_s": shard["samples"] / shard_s,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
