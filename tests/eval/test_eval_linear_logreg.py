"""Linear probe (7.2) and logistic regression (7.3): separable -> 100%, random -> chance, the grid's bookkeeping."""

import numpy as np
import pytest
import torch
from eval_synth import binomial_bound, random_features, separable
from numerics import SPREAD_FACTOR, max_abs_diff, report

from franca.eval import linear
from franca.eval.linear import (
    LINEAR_LRS,
    create_linear_input,
    evaluate_linear_grid,
    linear_probe,
    train_linear_grid,
)
from franca.eval.logreg import c_grid, logreg_eval


def _linear_feats(x, y, blocks=2, seed=0):
    """Wrap (n, D) features as linear-probe inputs: the class signal in the last block's CLS and patch mean."""
    g = torch.Generator().manual_seed(seed)
    earlier = torch.randn(x.shape[0], blocks - 1, x.shape[1], generator=g)
    return {"cls_tokens": torch.cat([earlier, x[:, None]], dim=1), "patch_mean": x + 0.01, "labels": y}


def test_create_linear_input_layout():
    feats = {"cls_tokens": torch.arange(2 * 3 * 2.0).reshape(2, 3, 2), "patch_mean": torch.full((2, 2), -1.0)}
    x = create_linear_input(feats, 2, True)
    assert x.shape == (2, 6)
    torch.testing.assert_close(x[0], torch.tensor([2.0, 3.0, 4.0, 5.0, -1.0, -1.0]))  # blocks 1, 2 then avgpool


def test_separable_classes_reach_100_percent_with_both_selections():
    torch.set_num_threads(1)
    train = _linear_feats(*separable(30, 4, seed=0))
    val = _linear_feats(*separable(20, 4, seed=1), seed=1)
    res = linear_probe(train, val, test=val, epochs=5, batch_size=32)
    m = res["metrics"]
    assert m["top1"] == 1.0 and m["top1_holdout_selected"] == 1.0 and m["test_top1_val_selected"] == 1.0
    # n_last_blocks {1, 4} clipped to the 2 blocks available: 2 x 2 x 13 cells
    assert len(res["details"]["val"]) == 2 * 2 * len(LINEAR_LRS)
    assert any(name.startswith("blocks2_") for name in res["details"]["val"])


def test_random_features_hold_out_selection_stays_at_chance():
    torch.set_num_threads(1)
    train = _linear_feats(*random_features(400, 4, seed=0))
    val = _linear_feats(*random_features(600, 4, seed=1), seed=1)
    res = linear_probe(train, val, epochs=3, batch_size=64, lrs=(1e-3, 1e-2, 0.1))
    m = res["metrics"]
    assert abs(m["top1_holdout_selected"] - 0.25) < binomial_bound(600, 0.25), m
    assert m["top1"] >= m["top1_holdout_selected"]  # selecting on val can only look better on val
    assert m["top1"] < 0.25 + binomial_bound(600, 0.25) + 0.05  # max of 12 correlated cells: a small optimism


def _lift_inputs(monkeypatch, dtype: torch.dtype) -> None:
    """create_linear_input's float32 cast (the features' storage type) lifted to ``dtype``."""
    monkeypatch.setattr(linear, "create_linear_input", lambda *args: create_linear_input(*args).to(dtype))


def _grid(dtype: torch.dtype, batched: bool, monkeypatch) -> tuple[dict, list, dict]:
    """The 52-cell grid trained by one path with ``dtype`` as the default dtype (weights, inputs, SGD state);
    create_linear_input's float32 cast (the features' storage type) is lifted to ``dtype``, and the initial weights
    are drawn in float32 as in the real use, so that runs in both dtypes start from the same weights."""
    _lift_inputs(monkeypatch, dtype)
    normal = torch.nn.init.normal_

    def normal32(t, mean, std, generator):  # the float32 initial weights whatever the dtype (same start)
        with torch.no_grad():
            return t.copy_(normal(torch.empty(t.shape, dtype=torch.float32), mean, std, generator=generator))

    monkeypatch.setattr(torch.nn.init, "normal_", normal32)
    x, y = random_features(300, 5, seed=3)
    x = x + 0.5 * torch.nn.functional.one_hot(y, 5).float().repeat(1, x.shape[1] // 5 + 1)[:, : x.shape[1]]
    feats = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _linear_feats(x, y, blocks=4).items()}
    cells = [(n, a, lr) for n in (1, 4) for a in (False, True) for lr in LINEAR_LRS]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        grid = train_linear_grid(feats, cells, 5, epochs=3, batch_size=64, seed=7, batched=batched)
        return {n: (m.weight.detach(), m.bias.detach()) for n, m in grid.items()}, cells, feats
    finally:
        torch.set_default_dtype(previous)


def test_batched_grid_equals_the_reference_loop(monkeypatch):
    """The stacked fast path trains the same 52 classifiers as one nn.Linear + SGD per cell.

    Tolerances (issue 14): in float64 the two paths are the same arithmetic summed in another order, so they agree
    to float64 rounding (~1e-16 relative; 1e-10 leaves room for 3 epochs of SGD-momentum growth). In float32 (the
    default use) their difference is float32 rounding, whose size depends on the CPU's kernels: it must stay within
    SPREAD_FACTOR x the float32 rounding error of the reference path itself, measured against its float64 run."""
    torch.set_num_threads(1)
    fast64, cells, feats64 = _grid(torch.float64, batched=True, monkeypatch=monkeypatch)
    slow64, _, _ = _grid(torch.float64, batched=False, monkeypatch=monkeypatch)
    fast, _, feats = _grid(torch.float32, batched=True, monkeypatch=monkeypatch)
    slow, _, _ = _grid(torch.float32, batched=False, monkeypatch=monkeypatch)
    assert fast.keys() == slow.keys() == fast64.keys() and len(fast) == 52
    flat = {f"{n}.{i}": t for n, pair in fast.items() for i, t in enumerate(pair)}
    flat_slow = {f"{n}.{i}": t for n, pair in slow.items() for i, t in enumerate(pair)}
    flat64 = {f"{n}.{i}": t for n, pair in fast64.items() for i, t in enumerate(pair)}
    flat_slow64 = {f"{n}.{i}": t for n, pair in slow64.items() for i, t in enumerate(pair)}
    scale = max(float(t.abs().max()) for t in flat64.values())
    assert max_abs_diff(flat64, flat_slow64) <= 1e-10 * scale
    rounding = max_abs_diff(flat_slow, flat_slow64)  # float32 rounding of the reference path
    name = "test_batched_grid_equals_the_reference_loop"
    report(name, "max |fast - reference| float64", max_abs_diff(flat64, flat_slow64), 1e-10 * scale)
    report(name, "max |fast - reference| float32", max_abs_diff(flat, flat_slow), SPREAD_FACTOR * rounding)
    assert 0 < rounding < 1e-3 * scale, (rounding, scale)
    assert max_abs_diff(flat, flat_slow) <= SPREAD_FACTOR * rounding
    init = train_linear_grid(feats, cells, 5, epochs=0, batch_size=64, seed=7)
    assert all(not torch.equal(fast[n][0], init[n].weight) for n in fast), "trained"
    # predictions compared in float64, where no near-tie of two logits can flip between the paths
    _lift_inputs(monkeypatch, torch.float64)
    as_linear = {}
    for grid in (fast64, slow64):
        layers = {}
        for n, (w, b) in grid.items():
            layers[n] = torch.nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
            layers[n].weight.data, layers[n].bias.data = w, b
        as_linear[id(grid)] = layers
    assert evaluate_linear_grid(as_linear[id(fast64)], cells, feats64) == evaluate_linear_grid(
        as_linear[id(slow64)], cells, feats64
    )


def test_logreg_grid_and_known_answers():
    grid = c_grid()
    assert len(grid) == 45 and grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1e5)
    tr_x, tr_y = separable(20, 3, seed=0)
    va_x, va_y = separable(20, 3, seed=1)
    res = logreg_eval(tr_x, tr_y, va_x, va_y, n_c=6)
    assert res["metrics"]["top1"] == 1.0 and res["metrics"]["mean_per_class"] == 1.0
    assert len(res["details"]["selection_top1"]) == 6
    # the weakest C (1e-6) cannot separate; the selected C is a stronger one
    assert res["metrics"]["best_c"] > 1e-6

    tr_x, tr_y = random_features(300, 3, seed=2)
    va_x, va_y = random_features(600, 3, seed=3)
    res = logreg_eval(tr_x, tr_y, va_x, va_y, n_c=4, finetune_on_val=True)
    assert abs(res["metrics"]["top1"] - 1 / 3) < binomial_bound(600, 1 / 3) + 0.02
    assert res["details"]["selected_on"] == "val"


def test_logreg_refit_uses_all_train_with_the_selected_c():
    tr_x, tr_y = random_features(80, 2, dim=4, seed=5)
    va_x, va_y = random_features(50, 2, dim=4, seed=6)
    res = logreg_eval(tr_x, tr_y, va_x, va_y, n_c=3)
    from sklearn.linear_model import LogisticRegression

    ref = LogisticRegression(C=res["metrics"]["best_c"], max_iter=1000, tol=1e-12).fit(tr_x.double(), tr_y)
    assert res["metrics"]["top1"] == pytest.approx(np.mean(ref.predict(va_x.double()) == va_y.numpy()))
