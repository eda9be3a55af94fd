"""Linear segmentation (7.5) and the position probe: known answers."""

import pytest
import torch
from eval_synth import stripe_scene

from franca.eval.linseg import linseg_eval
from franca.eval.position_probe import (
    evaluate_position_probe,
    position_r2,
    position_targets,
    position_variance_fraction,
)
from franca.rasa import RASAHead


def test_linseg_separable_stripes_reach_miou_one():
    torch.set_num_threads(1)
    train_tok, train_seg = stripe_scene(24, seed=0)
    val_tok, val_seg = stripe_scene(8, seed=1)
    res = linseg_eval(train_tok, train_seg, val_tok, val_seg, 3, epochs=15, batch_size=8, lr=5e-2)
    assert res["metrics"]["miou"] == 1.0 and res["metrics"]["train_miou"] == 1.0


def test_linseg_random_tokens_stay_poor():
    torch.set_num_threads(1)
    train_tok, train_seg = stripe_scene(24, seed=0)
    val_tok, val_seg = stripe_scene(8, seed=1)
    g = torch.Generator().manual_seed(0)
    res = linseg_eval(
        torch.randn(train_tok.shape, generator=g),
        train_seg,
        torch.randn(val_tok.shape, generator=g),
        val_seg,
        3,
        epochs=5,
        batch_size=8,
    )
    assert res["metrics"]["miou"] < 0.45  # chance for 3 balanced classes: about 1/3 pixel accuracy, IoU ~0.2


def test_position_targets_order():
    t = position_targets(3)
    assert t.shape == (9, 2)
    torch.testing.assert_close(t[1], torch.tensor([0.0, 0.5]))  # row-major: second patch is row 0, col 1
    torch.testing.assert_close(t[-1], torch.tensor([1.0, 1.0]))


def test_probe_exact_code_random_tokens_and_rasa():
    g = torch.Generator().manual_seed(0)
    side, dim = 5, 12
    plane = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:2]
    code = (position_targets(side) @ plane)[None]  # (1, N, D): exact linear code
    x_fit = code + 0.01 * torch.randn(40, side * side, dim, generator=g)
    x_eval = code + 0.01 * torch.randn(40, side * side, dim, generator=g)
    assert position_r2(x_eval, fit_tokens=x_fit)["r2"] > 0.99
    noise = torch.randn(40, side, side, dim, generator=g)
    assert position_r2(noise, fit_tokens=torch.randn(40, side, side, dim, generator=g))["r2"] < 0.02
    head = RASAHead(dim, plane[None])  # removes the code plane exactly
    res = evaluate_position_probe(x_fit, x_eval, rasa_head=head)
    assert res["metrics"]["r2"] > 0.99 and res["metrics"]["r2_rasa"] < 0.02 and res["metrics"]["r2_drop"] > 0.97
    assert res["details"]["grid"] == [side, side]


def test_position_variance_fraction_hand_computed():
    # two images of a 2x2 grid, D = 1
    x = torch.tensor([[[0.0], [2.0], [0.0], [2.0]], [[2.0], [4.0], [2.0], [4.0]]])
    # per-position means: 1, 3, 1, 3 -> between 1; total: values 0,2,0,2,2,4,2,4 around 2 -> 2
    assert position_variance_fraction(x) == pytest.approx(0.5)
