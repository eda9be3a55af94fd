"""franca plan's utilisation per training row: a recorded bench_mfu result of the row's shape and device kind (the
newest), else the stated default; explicit settings win; every training row prints its MFU source (issue 16).
No SLURM needed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from franca import flops
from franca.config import compose, stage_config
from franca.plan import DEFAULT_CPU_FLOPS, DEFAULT_MFU, GPU_PEAK_FLOPS, format_plan, main, plan

ONLY_PRETRAIN = {"seeds": [0], "highres": False, "rasa": False}
ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, kind: str, date: str, entries: list[dict]) -> Path:
    result = {"kind": "mfu", "device": f"NVIDIA {kind} 80GB HBM3", "device_kind": kind, "cpu_model": "x",
              "threads": 16, "date": date, "command": "test", "entries": entries}  # fmt: skip
    path.write_text(json.dumps(result))
    return path


def _entry(name: str, shape: dict, achieved: float, peak: float = 700e12) -> dict:
    return {"name": name, "shape": shape, "batch_per_device": 8, "achieved_flops_per_s": achieved,
            "mfu": achieved / peak}  # fmt: skip


def _pretrain_row(p):
    return next(r for r in p.rows if r.rule == "pretrain")


def test_plan_uses_the_newest_recorded_result_of_the_shape_and_device(tmp_path):
    cfg = stage_config(compose("paper_vitb14_in21k", "franca"), "pretrain")
    key = flops.step_shape_key(cfg)
    other = {**key, "embed_dim": 1024, "depth": 24, "num_heads": 16}
    _write(tmp_path / "mfu-h100-old.json", "H100", "2026-01-01T00:00:00+00:00", [_entry("vitb14", key, 100e12)])
    new = _write(tmp_path / "mfu-h100-new.json", "H100", "2026-06-01T00:00:00+00:00",
                 [_entry("vitl14", other, 500e12), _entry("vitb14", key, 300e12)])  # fmt: skip
    _write(tmp_path / "mfu-a100-newer.json", "A100", "2026-09-01T00:00:00+00:00", [_entry("vitb14", key, 90e12)])
    p = plan("paper_vitb14_in21k", {"franca": ONLY_PRETRAIN}, mfu_results=str(tmp_path))
    row = _pretrain_row(p)
    assert row.utilisation.rate == 300e12
    assert row.utilisation.mfu == pytest.approx(300e12 / GPU_PEAK_FLOPS["H100"])
    assert row.gpu_hours == pytest.approx(row.total_flops / 300e12 / 3600)
    assert str(new) in row.utilisation.source and "'vitb14'" in row.utilisation.source
    text = format_plan(p)
    assert f"MFU source: pretrain franca seed 0 pretrain1: {new} entry 'vitb14'" in text
    assert f"{300e12 / GPU_PEAK_FLOPS['H100']:.1%}" in text  # the MFU column
    # on A100 the A100 result is the one that matches
    a100 = _pretrain_row(plan("paper_vitb14_in21k", {"franca": ONLY_PRETRAIN}, gpu_type="A100",
                              mfu_results=str(tmp_path)))  # fmt: skip
    assert a100.utilisation.rate == 90e12 and "mfu-a100-newer.json" in a100.utilisation.source


def test_plan_falls_back_to_the_stated_default_and_says_so(tmp_path, capsys):
    p = plan("paper_vitb14_in21k", {"franca": ONLY_PRETRAIN}, mfu_results=str(tmp_path))
    row = _pretrain_row(p)
    assert row.utilisation.mfu == DEFAULT_MFU
    assert row.gpu_hours == pytest.approx(row.total_flops / (GPU_PEAK_FLOPS["H100"] * DEFAULT_MFU) / 3600)
    assert row.utilisation.source.startswith("default 40% (no recorded result for this shape on H100")
    cpu = _pretrain_row(plan("tiny", {"franca": ONLY_PRETRAIN}, mfu_results=str(tmp_path)))
    assert (
        cpu.utilisation.rate == DEFAULT_CPU_FLOPS
        and "no recorded result for this shape on cpu" in cpu.utilisation.source
    )
    assert main(["--preset", "tiny", "--mfu-results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    sources = [line for line in out.splitlines() if line.startswith("MFU source: ")]
    assert len(sources) == 2 and all("default 30.00 GFLOP/s" in line for line in sources)  # pretrain and highres


def test_explicit_mfu_wins_over_recorded(tmp_path):
    cfg = stage_config(compose("paper_vitb14_in21k", "franca"), "pretrain")
    _write(tmp_path / "mfu-h100-x.json", "H100", "2026-06-01", [_entry("vitb14", flops.step_shape_key(cfg), 3e14)])
    row = _pretrain_row(plan("paper_vitb14_in21k", {"franca": ONLY_PRETRAIN}, mfu=0.25, mfu_results=str(tmp_path)))
    assert row.utilisation.mfu == 0.25 and row.utilisation.source == "set by cluster.mfu / --mfu"


def test_malformed_result_is_named(tmp_path):
    (tmp_path / "mfu-h100-bad.json").write_text('{"entries": [')
    with pytest.raises(ValueError, match="mfu-h100-bad.json: not a bench_mfu result"):
        plan("paper_vitb14_in21k", {"franca": ONLY_PRETRAIN}, mfu_results=str(tmp_path))


def test_plan_reads_what_bench_mfu_writes(tmp_path):
    """One real (short) bench_mfu run of the tiny shape on this CPU, then plan uses its measured rate."""
    spec = importlib.util.spec_from_file_location("bench_mfu", ROOT / "benchmarks" / "bench_mfu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "mfu-cpu-test.json"
    argv = ["--device", "cpu", "--threads", "1", "--shapes", "tiny", "--batch", "tiny=4", "--steps", "1",
            "--warmup", "0", "--peak-n", "256", "--loop-shapes", "--out", str(out)]  # fmt: skip
    result = bench.main(argv)
    entry = result["entries"][0]
    assert result["device_kind"] == "cpu" and 0 < entry["mfu"] < 1
    assert (
        entry["flops_per_step"]
        == flops.training_step_flops(bench.shape_config("tiny", 4, bench.torch.device("cpu")), 4, 1).per_gpu
    )
    p = plan("tiny", {"franca": {"seeds": [0], "highres": True, "rasa": False}}, mfu_results=str(tmp_path))
    pretrain, highres = (r for r in p.rows if r.rule in ("pretrain", "highres"))
    assert pretrain.utilisation.rate == entry["achieved_flops_per_s"] and str(out) in pretrain.utilisation.source
    assert highres.utilisation.source.startswith("default")  # highres crops are another shape: nothing recorded
