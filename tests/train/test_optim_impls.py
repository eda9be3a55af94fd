"""optim.adamw_impl (issue 16 item 2): the fused and foreach AdamW kernels equal a per-parameter AdamW written from
the formula (spec 2.5), with every per-parameter multiplier (patch-embed lr, layer-wise decay, no-wd names, the last
layer's own lr) applied.

Tolerance from the float format (tests/numerics.py): the reference runs in float64 from the same float32 gradients,
so a float32 kernel differs from it only by its own rounding. Per step, |u - u64| <= C EPS32 adamw_step_bound(t) for
Adam's direction u = m_hat / (sqrt(v_hat) + eps) (m and v are sums of |g| terms whose relative rounding is a few units;
their ratio is bounded by adamw_step_bound whatever the gradients), and the update w (1 - lr wd) - lr u rounds to a
few units of max(|w|, lr |u|). C = 16 covers the ~8 rounded operations of each of the two parts.
"""

import pytest
import torch
from numerics import EPS32, adamw_step_bound, report
from test_ssl_meta_arch import build

from franca.train.optim import apply_schedules, build_optimizer

BETAS, EPS, C = (0.9, 0.999), 1e-8, 16.0
# (lr, wd, last_layer_lr) of 4 iterations: the last layer frozen first, then moving with its own rate
SCHEDULE = [(1e-3, 0.04, 0.0), (2e-3, 0.05, 0.0), (3e-3, 0.06, 1e-3), (2e-3, 0.08, 2e-3)]


def _reference_adamw(groups, grads):
    """Per-parameter float64 AdamW (decoupled wd): w <- w (1 - lr wd); w <- w - lr m_hat / (sqrt(v_hat) + eps)."""
    out = {}
    for g in groups:
        (p,) = g["params"]
        w, m, v = p.detach().double().clone(), torch.zeros_like(p, dtype=torch.float64), None
        v = torch.zeros_like(m)
        for t, ((lr, wd, last_lr), grad) in enumerate(zip(SCHEDULE, grads[g["name"]], strict=True), start=1):
            lr_t = (last_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]
            w = w * (1 - lr_t * wd * g["wd_multiplier"])
            m = BETAS[0] * m + (1 - BETAS[0]) * grad.double()
            v = BETAS[1] * v + (1 - BETAS[1]) * grad.double() ** 2
            m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
            w = w - lr_t * m_hat / (v_hat.sqrt() + EPS)
        out[g["name"]] = w
    return out


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_adamw_kernels_equal_the_per_parameter_reference(impl):
    model = build(**{"optim.layerwise_decay": 0.8})  # patch_embed_lr_mult 0.2 too
    groups = model.param_groups()
    assert {g["lr_multiplier"] for g in groups} > {1.0, 0.8**3, 0.2 * 0.8**3}  # decay per layer and patch embed
    gen = torch.Generator().manual_seed(1)
    grads = {g["name"]: [torch.randn(g["params"][0].shape, generator=gen) for _ in SCHEDULE] for g in groups}
    grads = {k: [g * 10.0 ** (i - 2) for i, g in enumerate(v)] for k, v in grads.items()}  # scales 1e-2 .. 10
    reference = _reference_adamw(groups, grads)
    optimizer = build_optimizer(groups, {"optim": {"betas": list(BETAS), "adamw_impl": impl}})
    assert bool(optimizer.defaults["fused"]) is (impl == "fused")
    assert optimizer.defaults["foreach"] is {"fused": None, "foreach": True, "for_loop": False}[impl]
    for step, (lr, wd, last_lr) in enumerate(SCHEDULE):
        apply_schedules(optimizer, lr, wd, last_lr)
        for g in groups:
            g["params"][0].grad = grads[g["name"]][step].clone()
        optimizer.step()
    worst = 0.0
    for g in groups:
        p, ref = g["params"][0].detach().double(), reference[g["name"]]
        lr_max = max(max(s[0], s[2]) for s in SCHEDULE) * g["lr_multiplier"]
        bound = sum(C * EPS32 * (lr_max * adamw_step_bound(t, BETAS) + ref.abs() + lr_max) for t in (1, 2, 3, 4))
        assert torch.all((p - ref).abs() <= bound), (g["name"], float((p - ref).abs().max()))
        worst = max(worst, float(((p - ref).abs() / bound).max()))
    report(f"adamw {impl}", "max |w - w64| / bound", worst, 1.0)


def test_unknown_adamw_impl_names_the_key():
    model = build()
    with pytest.raises(ValueError, match="optim.adamw_impl"):
        build_optimizer(model.param_groups(), {"optim": {"adamw_impl": "apex"}})
