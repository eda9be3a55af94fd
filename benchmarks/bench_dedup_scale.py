"""The dedup global step at scale (issue 17 "Done when"): near-duplicate pairs among ``--n`` generated 64-bit hashes
with planted near pairs, through the partitioned band jobs (``franca.data.bands``), next to today's in-memory
multi-index hashing (``phash.near_duplicate_pairs``) on ``--mih-n`` hashes in the same run, and an extrapolation to
10^9.

Hashes: uniformly random 64-bit values, then ``--planted`` of them copied with 1..threshold random bit flips
(uniform; real pHashes cluster, which makes buckets larger: the extrapolation is a lower bound on work). The map side
writes ``--units`` unit band indexes (as the per-unit jobs do); then every (band, block) job runs in turn, or a
random ``--sample-jobs`` of them (recall is then measured on the planted pairs those jobs own). Time, peak traced
memory (tracemalloc) and the process's max RSS (getrusage) per phase.

    nice -n 10 python benchmarks/bench_dedup_scale.py --n 10000000 --threshold 4 --bands 2 --block-bits 10
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
import tracemalloc
from math import comb
from pathlib import Path

import numpy as np

from franca.data import bands as band_lsh
from franca.data.phash import hamming, near_duplicate_pairs

log = logging.getLogger("bench_dedup_scale")


def generate(n: int, planted: int, threshold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n,) uint64 hashes whose last ``planted`` rows are copies of random earlier rows with 1..threshold flips;
    (planted, 2) int64 planted pairs (source, copy)."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    src = rng.choice(n - planted, planted, replace=False)
    flips = rng.integers(1, threshold + 1, planted)
    masks = np.zeros(planted, np.uint64)
    for k in range(1, threshold + 1):  # k distinct random bits for the copies with k flips
        rows = np.flatnonzero(flips == k)
        bits = np.argsort(rng.random((len(rows), 64)), axis=1)[:, :k].astype(np.uint64)
        masks[rows] = np.bitwise_or.reduce(np.uint64(1) << bits, axis=1)
    h[n - planted :] = h[src] ^ masks
    return h, np.stack([src, np.arange(n - planted, n)], axis=1)


def measured(fn, *args):
    """(result, CPU seconds of this process, peak traced MiB) of one call: CPU time, since the machine is shared."""
    tracemalloc.start()
    t0 = time.process_time()
    out = fn(*args)
    seconds = time.process_time() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def owner(plan: band_lsh.BandPlan, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(band, block) of the job that owns each pair (-1 band: no band within radius, i.e. beyond threshold)."""
    band = np.full(len(a), -1)
    for k in reversed(range(plan.bands)):
        band[hamming(plan.values(a, k), plan.values(b, k)) <= plan.radius] = k
    block = np.zeros(len(a), np.int64)
    for k in range(plan.bands):
        va, vb = plan.values(a, k), plan.values(b, k)
        small = np.minimum(va, vb)  # probed from the smaller band value
        block[band == k] = plan.blocks(small, k)[band == k].astype(np.int64)
    return band, block


def run_partitioned(h, pairs, plan, units: int, sample: int, seed: int, work: Path) -> dict:
    cuts = np.linspace(0, len(h), units + 1).astype(int)
    dirs = [work / f"u{u:06d}" for u in range(units)]

    def map_side():
        for u, d in enumerate(dirs):
            ids = np.arange(cuts[u], cuts[u + 1], dtype=np.uint64)
            band_lsh.write_band_index(h[cuts[u] : cuts[u + 1]], ids, plan, d)

    _, map_s, map_mib = measured(map_side)
    jobs = plan.jobs()
    rng = np.random.default_rng(seed)
    chosen = jobs if sample <= 0 or sample >= len(jobs) else [jobs[i] for i in sorted(rng.choice(len(jobs), sample))]
    found, times, peaks = [], [], []
    for band, block in chosen:
        out, seconds, peak = measured(band_lsh.block_pairs, dirs, plan, band, block)
        found.append(out)
        times.append(seconds)
        peaks.append(peak)
    got = np.concatenate(found)
    got_set = set(zip(got[:, 0].tolist(), got[:, 1].tolist(), strict=True))
    ob, oblock = owner(plan, h[pairs[:, 0]], h[pairs[:, 1]])
    mine = np.array([(b, p) in set(chosen) for b, p in zip(ob.tolist(), oblock.tolist(), strict=True)], bool)
    hits = sum((int(a), int(b)) in got_set for a, b in pairs[mine].tolist())
    return {
        "plan": {"threshold": plan.threshold, "bands": plan.bands, "block_bits": plan.block_bits},
        "radius_per_band": plan.radius,
        "units": units,
        "map_cpu_s": map_s,
        "map_peak_mib": map_mib,
        "index_bytes_per_row": plan.bands * 16,
        "jobs_total": len(jobs),
        "jobs_run": len(chosen),
        "job_cpu_s_mean": float(np.mean(times)),
        "job_cpu_s_max": float(np.max(times)),
        "job_cpu_s_total_run": float(np.sum(times)),
        "job_peak_mib_max": float(np.max(peaks)),
        "rows_loaded_per_job": len(h) * plan.load_fraction(),
        "pairs_found": len(got),
        "planted_pairs_owned_by_run_jobs": int(mine.sum()),
        "planted_recall": hits / max(1, int(mine.sum())),
    }


def extrapolate(result: dict, n: int, target: int, plan: band_lsh.BandPlan, job_rows: int) -> dict:
    """Jobs at ``target`` uniform hashes: the smallest ``block_bits`` whose jobs load at most ``job_rows`` rows, their
    count, rows, memory (measured bytes per loaded row) and CPU time (measured per probe row, times the growth of
    the buckets), and the total CPU hours."""
    widths = [plan.width(b) for b in range(plan.bands)]
    bucket_growth = float(np.mean([(1 + target / 2**w) / (1 + n / 2**w) for w in widths]))
    probe_rows = n / 2**plan.block_bits  # rows probed by one job here
    s_per_probe_row = result["job_cpu_s_mean"] / probe_rows
    # a job holds its loaded rows ~4 times (gathered slices, band values, sort order, sorted copy): 64 B per row on
    # top of the measured peak, which also holds the fixed (row x pattern) probe batch
    extra_mib = lambda rows: 64 * (rows - result["rows_loaded_per_job"]) / 2**20  # noqa: E731
    out = {"target_n": target, "job_rows_budget": job_rows, "bucket_growth": bucket_growth}
    for k in range(min(widths) + 1):
        frac = sum(comb(k, j) for j in range(min(plan.radius, k) + 1)) / 2**k
        if target * frac <= job_rows or k == min(widths):
            break
    out.update(block_bits=k, jobs=plan.bands * 2**k, rows_loaded_per_job=target * frac)
    out["rows_probed_per_job"] = target / 2**k
    out["job_peak_mib"] = result["job_peak_mib_max"] + extra_mib(target * frac)
    out["job_cpu_s"] = s_per_probe_row * bucket_growth * target / 2**k
    out["jobs_cpu_hours_total"] = out["job_cpu_s"] * out["jobs"] / 3600
    out["map_cpu_hours_total"] = result["map_cpu_s"] * target / n / 3600
    out["band_index_gib_total"] = target * result["index_bytes_per_row"] / 2**30
    return out


def run_mih(h: np.ndarray, threshold: int, bands: int, partitioned: tuple[np.ndarray, ...]) -> dict:
    (i, j, d, stats), seconds, peak = measured(near_duplicate_pairs, h, threshold, bands)
    equal = all(np.array_equal(x, y) for x, y in zip((i, j, d), partitioned, strict=True))
    return {
        "n": len(h),
        "cpu_s": seconds,
        "peak_mib": peak,
        "pairs": len(i),
        "stats": stats,
        "equal_partitioned": equal,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--planted", type=int, default=10_000)
    p.add_argument("--threshold", type=int, default=4)
    p.add_argument("--bands", type=int, default=2)
    p.add_argument("--block-bits", type=int, default=10)
    p.add_argument("--units", type=int, default=10)
    p.add_argument("--sample-jobs", type=int, default=0, help="run this many random jobs (0: all)")
    p.add_argument("--mih-n", type=int, default=1_000_000, help="in-memory reference size (both paths, compared)")
    p.add_argument("--target", type=int, default=1_000_000_000)
    p.add_argument("--job-rows", type=int, default=1 << 25, help="extrapolation: rows one job may load")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    plan = band_lsh.BandPlan(args.threshold, args.bands, args.block_bits)
    result = {"args": vars(args), "cpu_count_note": "shared 2-core machine, run under nice -n 10"}
    h, pairs = generate(args.mih_n, min(args.planted, args.mih_n // 10), args.threshold, args.seed)
    small = band_lsh.BandPlan(args.threshold, args.bands, 0)
    with tempfile.TemporaryDirectory() as work:
        (ref, seconds, peak) = measured(band_lsh.partitioned_pairs, h, small, work)
    result["mih_reference"] = run_mih(h, args.threshold, args.bands, ref)
    result["mih_reference"].update(partitioned_one_process_cpu_s=seconds, partitioned_one_process_peak_mib=peak)
    log.info("reference at %d: %s", args.mih_n, result["mih_reference"])
    h, pairs = generate(args.n, args.planted, args.threshold, args.seed)
    with tempfile.TemporaryDirectory() as work:
        result["partitioned"] = run_partitioned(h, pairs, plan, args.units, args.sample_jobs, args.seed, Path(work))
    log.info("partitioned at %d: %s", args.n, result["partitioned"])
    result["extrapolation"] = extrapolate(result["partitioned"], args.n, args.target, plan, args.job_rows)
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("extrapolation: %s", result["extrapolation"])
    out = Path(args.out) / f"dedup-scale-n{args.n}-t{args.threshold}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps(result, indent=2, default=float))
    print(out)


if __name__ == "__main__":
    main()
