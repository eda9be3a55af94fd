"""train.nan_check_period (issue 16 item 2): the non-finite loss check syncs with the host every k steps only, yet
still names the first non-finite iteration and its loss terms; period 1 (default) raises at the step itself."""

import contextlib

import pytest
from test_ssl_meta_arch import build, make_batch

from franca.train.loop import FiniteGuard, train_step
from franca.train.optim import build_optimizer

VALUES = {"lr": 1e-3, "wd": 0.04, "last_layer_lr": 1e-3, "momentum": 0.99, "teacher_temp": 0.05}


def _steps(monkeypatch, guard, poison_at, n_steps):
    """Run n_steps of train_step with the loss made NaN at iteration ``poison_at``; returns the iterations done."""
    model = build()
    original = type(model).compute_losses

    def poisoned(self, student_out, targets, batch, _it=[0]):  # noqa: B006 - a step counter
        losses = original(self, student_out, targets, batch)
        if _it[0] == poison_at:
            losses["ibot_loss"] = losses["ibot_loss"] * float("nan")
            losses["loss"] = losses["loss"] + losses["ibot_loss"]
        _it[0] += 1
        return losses

    monkeypatch.setattr(type(model), "compute_losses", poisoned)
    optimizer, batch, done = build_optimizer(model.param_groups(), {}), make_batch(), []
    with pytest.raises(FloatingPointError) as err:
        for it in range(n_steps):
            train_step(model, batch, optimizer, None, VALUES, 3.0, contextlib.nullcontext, it, guard)
            done.append(it)
    return done, str(err.value)


def test_deferred_check_names_the_first_bad_iteration(monkeypatch):
    done, message = _steps(monkeypatch, FiniteGuard(3), poison_at=1, n_steps=6)
    assert done == [0, 1]  # iteration 1 went on (no sync), iteration 2's check raised
    assert "at iteration 1 (checked at iteration 2)" in message and "ibot_loss=nan" in message


def test_default_check_raises_at_the_step(monkeypatch):
    done, message = _steps(monkeypatch, None, poison_at=1, n_steps=3)
    assert done == [0] and "at iteration 1 (checked at iteration 1)" in message
    with pytest.raises(ValueError, match="train.nan_check_period"):
        FiniteGuard(0)
