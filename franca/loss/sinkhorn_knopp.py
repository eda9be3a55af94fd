"""Sinkhorn-Knopp teacher targets for the DINO (CLS) and iBOT (patch) heads (spec 2.2, quirks Q3, Q4).

Both run on Q = exp(T / tau)^T (K, n) in fp32 for ``n_iterations`` (3) rounds of

1. r = row sums of Q, all-reduced across processes; Q /= r; Q /= K   (each prototype gets total mass 1/K);
2. Q /= column sums (local: columns are local samples); Q /= B_tot   (each sample gets mass 1/B_tot);

and finally Q *= B_tot, so every sample's assignment sums to 1; the target is Q^T (n, K).

* DINO: B_tot = n * world_size.
* iBOT: Q is first divided by its all-reduced total sum, and B_tot is the all-reduced number of masked patches,
  computed once by the caller with ``global_count`` (Q4: the official code all-reduces it in place once per level,
  which only rescales a quantity that cancels). Padding rows (Q3) are the caller's business.

Collectives are injected: ``all_reduce`` is a callable that returns the sum of a tensor over all processes (for
``torch.distributed`` wrap ``dist.all_reduce``); None means a single process. Nothing here imports a process group.

Overflow guard (not in the official code): the logits are shifted by c = max(0, global_max - 80) before exp. The
same constant on every process multiplies all of Q by exp(-c), which the first row normalisation (DINO) or the
total-sum division (iBOT) removes exactly, so the targets are unchanged; c = 0 whenever exp cannot overflow, so the
computation is then bit-identical to the official one. The global max needs ``all_reduce_max`` across processes;
without it the mean of the per-process maxima is used (still one constant on every process, hence exact, but it only
guards against overflow on average).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["SinkhornKnopp"]

AllReduce = Callable[[torch.Tensor], torch.Tensor]

# exp(x) overflows fp32 above ~88.7; keep the largest exponent at 80
_MAX_EXPONENT = 80.0


class SinkhornKnopp:
    """Per-head, per-level Sinkhorn-Knopp normaliser with injected collectives (spec 2.2)."""

    def __init__(
        self,
        n_iterations: int = 3,
        all_reduce: AllReduce | None = None,
        world_size: int = 1,
        overflow_guard: bool = True,
        all_reduce_max: AllReduce | None = None,
    ) -> None:
        if n_iterations < 1:
            raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
        if world_size > 1 and all_reduce is None:
            raise ValueError(f"world_size={world_size} needs an all_reduce callable")
        self.n_iterations = n_iterations
        self.all_reduce = all_reduce
        self.world_size = world_size
        self.overflow_guard = overflow_guard
        self.all_reduce_max = all_reduce_max

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(t) if self.all_reduce is not None else t

    def global_count(self, n_local: torch.Tensor | int) -> torch.Tensor:
        """The all-reduced count (e.g. masked patches over all processes) as an fp32 scalar; call once per step."""
        n = torch.as_tensor(n_local, dtype=torch.float32).reshape(()).clone()
        return self._sum(n)

    def _shift(self, scaled: torch.Tensor) -> torch.Tensor:
        """The constant c >= 0 subtracted from every scaled logit, identical on every process."""
        local = scaled.max() if scaled.numel() else scaled.new_tensor(float("-inf"))
        if self.all_reduce_max is not None:
            global_max = self.all_reduce_max(local.clone())
        elif self.all_reduce is not None and self.world_size > 1:
            global_max = self.all_reduce(local.clone()) / self.world_size
        else:
            global_max = local
        return (global_max - _MAX_EXPONENT).clamp(min=0.0)

    def _exp_transposed(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        scaled = teacher_logits.float() / teacher_temp  # (n, K)
        if self.overflow_guard:
            scaled = scaled - self._shift(scaled)
        return torch.exp(scaled).t()  # (K, n)

    def _iterate(self, q: torch.Tensor, b_tot: torch.Tensor | float) -> torch.Tensor:
        k = q.shape[0]
        for _ in range(self.n_iterations):
            q = q / self._sum(q.sum(dim=1, keepdim=True))  # rows: global mass per prototype
            q = q / k  # each prototype now has total mass 1/K
            q = q / q.sum(dim=0, keepdim=True)  # columns are local samples
            q = q / b_tot  # each sample now has mass 1/B_tot
        return (q * b_tot).t()  # (n, K); every row sums to 1

    @torch.no_grad()
    def dino_targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Targets (n, K) for the CLS logits (n, K) of this process; B_tot = n * world_size."""
        q = self._exp_transposed(teacher_logits, teacher_temp)
        return self._iterate(q, float(q.shape[1] * self.world_size))

    @torch.no_grad()
    def ibot_targets(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_masked_total: torch.Tensor | float
    ) -> torch.Tensor:
        """Targets (n, K) for masked-patch logits (n, K); ``n_masked_total`` from ``global_count`` (B_tot)."""
        q = self._exp_transposed(teacher_logits, teacher_temp)
        q = q / self._sum(q.sum())  # Q sums to 1 over all processes
        return self._iterate(q, n_masked_total)
