"""Small units of the paper stage: cell formatting, PCA colouring, provenance lookup, LaTeX escaping."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from franca.paper.build import dedup_counts, tex_escape
from franca.paper.collect import PaperInputError, SourceIndex, collect_training, parse_experiments
from franca.paper.figures import pca_rgb
from franca.paper.tables import Cell


def test_cell_text_and_sample_std():
    cell = Cell.of("pct", [50.0, 52.0, 57.0], ["a", "b", "a"])
    # sample std by hand: mean 53, squared deviations 9 + 1 + 16 = 26, / (3 - 1) = 13
    assert cell.mean == pytest.approx(53.0) and cell.std == pytest.approx(13**0.5)
    assert cell.text == "53.0 ± 3.6 (n=3)" and cell.sources == ["a", "b"]
    assert Cell.of("r2", [0.25], ["x"]).text == "0.250 (n=1)"
    assert Cell.of("pct", [float("nan")], ["x"]).text == ""  # NaN values are not aggregated
    assert Cell("delta-pct", mean=1.04).text == "+1.0"  # deltas are signed, without spread
    assert Cell("delta-r2", mean=-0.0123).text == "-0.012"


def test_pca_rgb_recovers_planted_components():
    rows, cols = np.meshgrid(np.arange(6.0), np.arange(7.0), indexing="ij")  # (6, 7)
    d = 16
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(d, 3)))[0].T  # 3 orthonormal directions
    tokens = 10.0 * rows[..., None] * basis[0] + 3.0 * cols[..., None] * basis[1]  # (6, 7, D)
    tokens = tokens + 0.01 * np.random.default_rng(1).normal(size=tokens.shape)
    rgb = pca_rgb(tokens[None])[0]  # (6, 7, 3)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    assert abs(np.corrcoef(rgb[..., 0].ravel(), rows.ravel())[0, 1]) > 0.999  # largest variance: the rows
    assert abs(np.corrcoef(rgb[..., 1].ravel(), cols.ravel())[0, 1]) > 0.999
    assert rgb[..., 0].max() == pytest.approx(1.0) and rgb[..., 0].min() == pytest.approx(0.0)


def test_source_index_finds_provenance_and_flags_hash_mismatch(tmp_path):
    folder = tmp_path / "results" / "eval" / "e" / "s0" / "pretrain"
    folder.mkdir(parents=True)
    good, bad = folder / "knn.json", folder / "linear.json"
    good.write_text("{}")
    bad.write_text("{}")
    outputs = {
        f"results/eval/e/s0/pretrain/{p.name}": {"sha256": hashlib.sha256(b"{}").hexdigest()} for p in (good, bad)
    }
    (folder / "provenance.json").write_text(
        json.dumps(
            {"stage": "eval", "outputs": outputs, "mlflow_run_id": "r1", "code": {"git_commit": "abc", "dirty": True}}
        )
    )
    bad.write_text('{"tampered": 1}')
    index = SourceIndex(tmp_path)
    rec = index.records[index.add(good)]
    assert (rec["mlflow_run_id"], rec["git_commit"], rec["dirty"]) == ("r1", "abc", True)
    assert rec["provenance"] == "results/eval/e/s0/pretrain/provenance.json" and "note" not in rec
    assert "sha256 differs" in index.records[index.add(bad)]["note"]
    (folder / "provenance.json").write_text("[1, 2")
    with pytest.raises(PaperInputError, match="provenance.json"):
        SourceIndex(tmp_path).add(good)


def test_training_phases_are_offset_when_the_counter_restarts(tmp_path):
    base, paths = tmp_path / "results", []
    for phase, iters in (
        ("pretrain/e/s0/stage1", [0, 10, 20]),
        ("pretrain/e/s0/stage2", [0, 10]),
        ("highres/e/s0", [0, 5]),
    ):
        (base / phase).mkdir(parents=True)
        lines = [json.dumps({"iteration": i, "total_loss": 1.0, "lr": 0.5}) for i in iters]
        (base / phase / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        paths.insert(0, base / phase / "metrics.jsonl")  # given out of order: sorted into training order
    frame = collect_training(paths, SourceIndex(tmp_path))
    assert list(frame["phase"]) == ["stage1"] * 3 + ["stage2"] * 2 + ["highres"] * 2
    assert list(frame["iteration"]) == [0, 10, 20, 20, 30, 30, 35]
    assert set(frame["term"]) == {"total_loss"}  # lr is not a loss term
    (base / "highres/e/s0/metrics.jsonl").write_text('{"iteration": 0, "total_loss": 1.0}\n{"iteration": 1,\n')
    with pytest.raises(PaperInputError, match=r"highres/e/s0/metrics.jsonl:2"):
        collect_training(paths, SourceIndex(tmp_path))


def test_dedup_counts_shapes(tmp_path):
    path = tmp_path / "report.json"
    assert dedup_counts({"removed_by_reason": {"exact": 3, "near": [1, 2]}, "kept": 7}, path) == (
        {"exact": 3, "near": 2},
        7,
    )
    removed = [{"key": "a", "reason": "exact"}, {"key": "b", "reason": "eval"}, {"key": "c", "reason": "exact"}]
    assert dedup_counts({"removed": removed}, path) == ({"exact": 2, "eval": 1}, None)
    with pytest.raises(PaperInputError, match="report.json"):
        dedup_counts({"kept": 3}, path)


def test_tex_escape():
    assert tex_escape("x_no_pos & 50% ± Δ R^2") == r"x\_no\_pos \& 50\% $\pm$ $\Delta$ R$^2$"


def test_parse_experiments_requires_seeds():
    with pytest.raises(PaperInputError, match="experiments.franca"):
        parse_experiments({"franca": {"highres": True}})


def test_training_curves_carry_the_uniform_target_value(tmp_path):
    """Issue 13: a clustering term's uniform-target value, logged as ``<term>`` with ``_loss`` -> ``_uniform``, is
    read with the term and drawn as a dashed line; terms without one get NaN and no line."""
    from franca.paper.figures import training_curves

    run = tmp_path / "results" / "pretrain" / "e" / "s0" / "stage1"
    run.mkdir(parents=True)
    rows = [{"iteration": i, "ibot_loss": 10.0 - i, "ibot_uniform": 10.4, "koleo_loss": 0.2} for i in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    frame = collect_training([run / "metrics.jsonl"], SourceIndex(tmp_path))
    ibot, koleo = frame[frame["term"] == "ibot_loss"], frame[frame["term"] == "koleo_loss"]
    assert list(ibot["uniform"]) == [10.4] * 3 and koleo["uniform"].isna().all()
    assert "ibot_uniform" not in set(frame["term"])
    with_line, without = training_curves(frame, "e"), training_curves(frame.assign(uniform=float("nan")), "e")
    assert with_line is not None and without is not None and with_line != without
