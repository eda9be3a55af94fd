"""Fetch throughput against a loopback server, the current fetcher next to the baseline one (issue 17 "Done when").

A threaded HTTP server in its own process serves generated JPEGs (``--size`` px, quality 90) under a realistic mix
of answers; each URL table is fetched by the fetcher of this checkout (``franca.data.fetch``) and by the fetcher of
``--baseline`` (``git show REV:franca/data/fetch.py`` loaded as a temporary module), in the same run:
  * ``happy``: ``--n`` URLs that all answer at once;
  * ``mix``: the same count with ``--slow`` (answer after ``--slow-s``), ``--dead`` (never answer), ``--not-found``
    (404) and ``--unavailable`` (503) fractions of URLs (at least 10 % in all by default).
Per run: URLs/s, client CPU-s per 1,000 stored images (this process, all threads; the server runs elsewhere),
outcome counts, and whether both fetchers wrote byte-identical tars. For the mix, the bound of issue 17: the mix may
not take longer than the happy path plus the connection-seconds of its bad URLs (dead: every attempt's deadline;
slow: the wait; 503: the backoff sleeps) spread over the concurrency, plus one dead URL's deadline (the tail: a dead
URL among the last rows ends one deadline after its start, whatever the fetcher).

    nice -n 10 .venv/bin/python benchmarks/bench_fetch.py --n 4000 --out benchmarks/results/

Prints one JSON object (written to ``--out``, a file or a folder, when given).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import json
import logging
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

import franca.data.fetch as current
from franca.data.synthetic import pink_noise

BASELINE = "781f18c4cd46cb87155c0e93d0c158bf3183d8ab"  # main when issue 17's fetcher work branched off
REPO = Path(__file__).resolve().parents[1]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512


def _serve_forever(images: list[bytes], slow_s: float, port_queue) -> None:
    """Runs in its own process, so that the server does not compete with the client for the GIL.
    Routes: /img/<i>.jpg, /slow/<i>.jpg (after ``slow_s``), /dead/<i> (never answers), /404/<i>, /503/<i>."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real image hosts

        def log_message(self, *args):
            return

        def do_GET(self):  # noqa: N802 (http.server API)
            kind, name = self.path.split("/")[1:3]
            if kind == "dead":
                time.sleep(3600)
            if kind in ("404", "503"):
                self.send_response(int(kind))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if kind == "slow":
                time.sleep(slow_s)
            body = images[int(name.split(".")[0]) % len(images)]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = _Server(("127.0.0.1", 0), Handler)
    server.handle_error = lambda request, address: None  # clients close idle keep-alive connections at their end
    port_queue.put(server.server_address[1])
    server.serve_forever()


def serve(images: list[bytes], slow_s: float) -> tuple[mp.Process, str]:
    queue = mp.get_context("fork").Queue()
    process = mp.get_context("fork").Process(target=_serve_forever, args=(images, slow_s, queue), daemon=True)
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


def load_baseline(rev: str):
    """The fetcher of ``rev`` as a module of its own (it imports today's franca.data.images/manifest/shards)."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:franca/data/fetch.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "fetch_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fetch_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def url_table(base: str, n: int, fractions: dict[str, float], seed: int = 0) -> tuple[list[str], dict[str, int]]:
    """``n`` URLs, ``round(f * n)`` of each bad kind at random rows, the others good (/img/<row>.jpg)."""
    kinds = np.array(["img"] * n, dtype=object)
    rows = np.random.default_rng(seed).permutation(n)
    start, counts = 0, {}
    for kind, f in fractions.items():
        counts[kind] = round(f * n)
        kinds[rows[start : start + counts[kind]]] = kind
        start += counts[kind]
    urls = [f"{base}/{k}/{i}.jpg" for i, k in enumerate(kinds)]
    return urls, counts


def run(fetcher, urls: list[str], tmp: Path, name: str, args) -> dict:
    table = tmp / f"{name}.parquet"
    pd.DataFrame({"url": urls, "caption": "x"}).to_parquet(table)
    opts = {"shard_size": args.shard_size, "concurrency": args.concurrency, "timeout": args.timeout}
    opts.update(retries=args.retries, backoff=args.backoff, reencode="never", allow_private_addresses=True)
    cpu, wall = time.process_time(), time.perf_counter()
    report = fetcher.fetch_urls(table, tmp / name, **opts)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "elapsed_s": round(wall, 3),
        "urls_per_s": round(len(urls) / wall, 1),
        "client_cpu_s": round(cpu, 3),
        "cpu_s_per_1000_images": round(1000 * cpu / max(report["success"], 1), 3),
        "success": report["success"],
        "reasons": report["reasons"],
    }


def same_tars(a: Path, b: Path) -> bool:
    tars = sorted(p.name for p in a.glob("*.tar"))
    return tars == sorted(p.name for p in b.glob("*.tar")) and all(
        (a / t).read_bytes() == (b / t).read_bytes() for t in tars
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument("--backoff", type=float, default=0.5)
    parser.add_argument("--slow", type=float, default=0.0375, help="fraction of URLs answering after --slow-s")
    parser.add_argument("--slow-s", type=float, default=0.5)
    parser.add_argument("--dead", type=float, default=0.0025, help="fraction of URLs that never answer")
    parser.add_argument("--not-found", type=float, default=0.03)
    parser.add_argument("--unavailable", type=float, default=0.03, help="fraction answering 503")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline fetcher")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    baseline = load_baseline(args.baseline)
    server, base = serve(make_images(64, args.size), args.slow_s)
    fractions = {"slow": args.slow, "dead": args.dead, "404": args.not_found, "503": args.unavailable}
    mix, counts = url_table(base, args.n, fractions)
    happy = [f"{base}/img/{i}.jpg" for i in range(args.n)]
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for table_name, urls in (("happy", happy), ("mix", mix)):  # each table by both fetchers back to back
            for name, fetcher in (("current", current), ("baseline", baseline)):
                runs[f"{name}_{table_name}"] = run(fetcher, urls, Path(tmp), f"{name}_{table_name}", args)
                print(f"{name} {table_name}: {runs[f'{name}_{table_name}']}", file=sys.stderr)
        identical = {t: same_tars(Path(tmp) / f"current_{t}", Path(tmp) / f"baseline_{t}") for t in ("happy", "mix")}
    server.terminate()
    server.join()
    deadline = args.timeout * (args.retries + 1) + args.backoff * (2**args.retries - 1)  # one dead URL's time
    extra = (
        counts["dead"] * deadline + counts["slow"] * args.slow_s + counts["503"] * args.backoff * (2**args.retries - 1)
    )
    spread = extra / args.concurrency  # issue 17: the bad URLs' connection-seconds spread over the concurrency
    # a dead URL among the last rows ends one deadline after it starts, whatever the fetcher: the tail term
    bound = {k: runs[f"{k}_happy"]["elapsed_s"] + spread + deadline for k in ("current", "baseline")}
    result = {
        "benchmark": "fetch_loopback_vs_baseline",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # other processes sharing the cores
        "argv": sys.argv[1:],
        "baseline_rev": args.baseline,
        "n_urls": args.n,
        "mix_counts": counts,
        "image_px": args.size,
        "concurrency": args.concurrency,
        "runs": runs,
        "dead_url_deadline_s": deadline,
        "bad_urls_spread_s": round(spread, 3),
        "mix_minus_happy_s": {
            k: round(runs[f"{k}_mix"]["elapsed_s"] - runs[f"{k}_happy"]["elapsed_s"], 3) for k in bound
        },
        "mix_bound_s": {k: round(v, 3) for k, v in bound.items()},  # happy + spread + one deadline (the tail)
        "mix_within_bound": {k: runs[f"{k}_mix"]["elapsed_s"] <= bound[k] for k in bound},
        "identical_tars": identical,
        "speedup_urls_per_s": {
            t: round(runs[f"current_{t}"]["urls_per_s"] / runs[f"baseline_{t}"]["urls_per_s"], 2)
            for t in ("happy", "mix")
        },
        "cpu_per_image_ratio": {
            t: round(runs[f"current_{t}"]["cpu_s_per_1000_images"] / runs[f"baseline_{t}"]["cpu_s_per_1000_images"], 3)
            for t in ("happy", "mix")
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        out = (
            args.out / f"fetch-{result['date'].replace(':', '').replace('-', '')}.json"
            if args.out.is_dir()
            else args.out
        )
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
