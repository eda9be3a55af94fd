"""Tolerances from the numerics, not from one CPU (issue 14).

Two float32 computations of the same mathematical quantity that sum in another order (2 processes vs 1, another
batch layout, a batched vs a per-cell path, another CPU's kernels: AVX-512 vs AVX2 vs scalar, another MKL GEMM
blocking) differ by rounding whose size depends on the CPU. A fixed atol chosen on one machine is not derived from
anything. The tests use one of:

* exact equality where the same code runs on the same inputs in the same process layout (resume, srun vs torchrun);
* a bound from the float format: a few units of float32 rounding (``EPS32``) relative to the magnitudes summed, or a
  comparison against a float64 reference;
* the spread measured in the same test: the reference computed again with only its summation order changed, and a
  small multiple (``SPREAD_FACTOR``) of that spread allowed;
* after AdamW: ``adamw_drift_bound``. Adam's step m_hat / sqrt(v_hat) is scale-free, so a rounding-level change of a
  near-zero gradient can flip the sign of a whole step of ~lr; no rounding bound holds there, only this one.

``report`` prints each measured spread with its bound once (run pytest with ``-s`` to see them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

EPS32 = float(torch.finfo(torch.float32).eps)  # 1.19e-7: one unit of float32 rounding relative to the value
# how much larger than a measured reduction-order spread a difference of the same kind may be: the measured spreads
# of several reorderings of one run differ by up to 2.7x from each other (tests/cluster/test_distributed_rule.py)
SPREAD_FACTOR = 4.0


def max_abs_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest |a - b| over all tensors of two dicts with the same keys (compared in float64)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def l2_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Euclidean norm of a - b over all elements of all tensors (float64)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a))


def adamw_step_bound(t: int, betas: Sequence[float] = (0.9, 0.999)) -> float:
    """Upper bound of |m_hat_t| / sqrt(v_hat_t) at Adam step t (1-based), for ANY gradient sequence.

    m_hat = (1-b1) sum_k b1^k g_k / (1-b1^t), v_hat = (1-b2) sum_k b2^k g_k^2 / (1-b2^t), k < t. Cauchy-Schwarz:
    sum_k b1^k |g_k| <= sqrt(sum_k (b1^2/b2)^k) sqrt(sum_k b2^k g_k^2). Equals 1 at t = 1 (Adam's first step is
    lr * sign(g)); 1.02 at t = 6, 2.2 at t = 100, 7.3 as t -> inf with the default betas."""
    b1, b2 = betas
    geometric = sum((b1 * b1 / b2) ** k for k in range(t))
    return (1 - b1) / (1 - b1**t) * math.sqrt((1 - b2**t) / (1 - b2)) * math.sqrt(geometric)


def adamw_drift_bound(lrs: Sequence[float], betas: Sequence[float] = (0.9, 0.999)) -> float:
    """Largest |w - w'| of two AdamW runs from the same weights whose gradients differ arbitrarily (per element,
    lr multipliers <= 1): sum over steps of 2 lr_t bound_t. Decoupled weight decay multiplies the difference by
    (1 - lr wd) <= 1, so it only shrinks it. The teacher, an EMA of the student, obeys the same bound."""
    return sum(2 * lr * adamw_step_bound(t, betas) for t, lr in enumerate(lrs, start=1))


def report(test: str, quantity: str, measured: float, bound: float) -> None:
    """Print a measured spread next to the bound the test allows (visible with ``pytest -s``)."""
    print(f"[numerics] {test}: {quantity} measured {measured:.3g} bound {bound:.3g}")


def relative_spread(a: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> float:
    """Largest per-tensor max |a - ref| / max |ref|: the rounding level of a computation, in units of its scale."""
    assert a.keys() == ref.keys(), sorted(set(a) ^ set(ref))
    return max(float((a[k].double() - ref[k].double()).abs().max() / ref[k].double().abs().max()) for k in ref)


def adamw_first_step_bound(g: torch.Tensor, delta: float, lr: float, w: torch.Tensor, eps: float = 1e-8):
    """Per element: the largest |w1 - w2| after AdamW's first step from the same weights ``w`` (either result) with
    gradients g and g' = g + d, |d| <= delta, lr multipliers <= 1.

    Step 1 moves by lr * u(g) with u(g) = g / (|g| + eps) (m_hat = g, v_hat = g^2): |u| <= 1, u' = eps / (|g| + eps)^2,
    so |u(g) - u(g')| <= min(2, delta * eps / (max(|g| - delta, 0) + eps)^2). A gradient within delta of 0 may flip
    the whole step (2 lr); a clear one moves by far less than one float32 unit. Plus float32 rounding of w - lr u:
    2 units of max(|w_before|, lr) <= |w| + 2 lr. Decoupled weight decay is the same on both sides."""
    g = g.double().abs()
    du = torch.clamp(delta * eps / ((g - delta).clamp(min=0) + eps) ** 2, max=2.0)
    return lr * du + 2 * EPS32 * (w.double().abs() + 2 * lr)
