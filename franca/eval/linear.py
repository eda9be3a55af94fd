"""Linear probe on frozen features (spec 7.2; DINOv2's eval/linear.py protocol, on precomputed features).

The grid: n_last_blocks in {1, 4} (clipped to the blocks available) x avgpool in {False, True} x 13 learning rates,
one Linear per cell (52), all trained together on the same mini-batches:
  * input = concatenated normed CLS of the last n blocks (+ the mean of the last block's patch tokens if avgpool);
  * lr = base_lr * batch_size / 256; weights N(0, 0.01), zero bias;
  * SGD momentum 0.9, no weight decay, cosine lr to 0 over epochs * ceil(n / batch_size) iterations.
Selection, two ways (both reported, so the choice is visible):
  * ``top1``: the best classifier by **val** top-1, trained on all of train (DINOv2 selects on val);
  * ``top1_holdout_selected``: the cell chosen by top-1 on a held-out fraction of train (classifiers trained on the
    rest), then read off the full-train run on val (and on test when given).
Deviations: DINOv2 trains on RandomResizedCrop + flip views each iteration; here the features are extracted once
with the eval transform (as the log-regression protocol does), which keeps the probe cheap and deterministic; and
the classifiers are evaluated once, at the end (DINOv2 also evaluates every 1250 iterations).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["LINEAR_LRS", "create_linear_input", "train_linear_grid", "evaluate_linear_grid", "linear_probe"]

LINEAR_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


def create_linear_input(feats: dict, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """(n, n_last_blocks * D [+ D]) input from {cls_tokens (n, B, D), patch_mean (n, D)} (B blocks, last is final)."""
    cls_tokens = feats["cls_tokens"]
    x = cls_tokens[:, -n_last_blocks:].reshape(cls_tokens.shape[0], -1)
    if avgpool:
        if feats.get("patch_mean") is None:
            raise KeyError("avgpool needs 'patch_mean' in the linear features")
        x = torch.cat([x, feats["patch_mean"]], dim=1)
    return x.float()


def _grid(feats: dict, n_last_blocks_list: Sequence[int], avgpool_list: Sequence[bool], lrs: Sequence[float]):
    available = feats["cls_tokens"].shape[1]
    blocks = sorted({max(1, min(int(n), available)) for n in n_last_blocks_list})
    if feats.get("patch_mean") is None:
        avgpool_list = [a for a in avgpool_list if not a]
    return [(n, bool(a), float(lr)) for n in blocks for a in dict.fromkeys(avgpool_list) for lr in lrs]


def _name(cell: tuple[int, bool, float]) -> str:
    n, avgpool, lr = cell
    return f"blocks{n}_avgpool{int(avgpool)}_lr{lr:g}"


def train_linear_grid(
    feats: dict,
    cells: Sequence[tuple[int, bool, float]],
    num_classes: int,
    epochs: int = 10,
    batch_size: int = 128,
    seed: int = 0,
    batched: bool = True,
) -> dict[str, nn.Linear]:
    """Train one Linear per (n_last_blocks, avgpool, base_lr) cell on the same shuffled mini-batches.

    ``batched`` (default) stacks the cells of one input kind into one (L, C, D) weight and runs them as one batched
    matmul; the reference path (``batched=False``) runs one nn.Linear per cell through torch.optim.SGD. Both draw
    the same initial weights and batches and apply the same SGD-momentum update with the same lr sequence; they agree
    to float32 rounding (tests/eval/test_eval_linear_logreg.py), ~20x faster at 52 cells.
    """
    labels = feats["labels"].long()
    n = labels.shape[0]
    inputs = {(c[0], c[1]): create_linear_input(feats, c[0], c[1]) for c in cells}  # shared per input kind
    generator = torch.Generator().manual_seed(seed)
    classifiers, groups = {}, []
    for cell in cells:
        layer = nn.Linear(inputs[cell[:2]].shape[1], num_classes)
        nn.init.normal_(layer.weight, mean=0.0, std=0.01, generator=generator)
        nn.init.zeros_(layer.bias)
        classifiers[_name(cell)] = layer
        groups.append({"params": list(layer.parameters()), "lr": cell[2] * batch_size / 256.0})
    optim = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    total = max(1, epochs * math.ceil(n / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=total, eta_min=0.0)
    if batched:
        _train_stacked(classifiers, cells, inputs, labels, optim, sched, epochs, batch_size, generator)
        return classifiers
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = sum(F.cross_entropy(classifiers[_name(c)](inputs[c[:2]][idx]), labels[idx]) for c in cells)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
    return classifiers


def _train_stacked(classifiers, cells, inputs, labels, optim, sched, epochs, batch_size, generator) -> None:
    """The reference loop with each input kind's L cells stacked: weight (L, C, D), bias (L, C), momentum alike.

    The optimizer is only stepped for its lr schedule (the groups' lr per step, in cell order); the update is
    SGD's own (buf = 0.9 buf + grad, the first buf = grad; p -= lr * buf), applied per cell slice.
    """
    kinds: dict[tuple, list[int]] = {}
    for i, cell in enumerate(cells):
        kinds.setdefault(cell[:2], []).append(i)
    params = {
        kind: [
            torch.stack([classifiers[_name(cells[i])].weight.detach() for i in idx]).requires_grad_(),
            torch.stack([classifiers[_name(cells[i])].bias.detach() for i in idx]).requires_grad_(),
        ]
        for kind, idx in kinds.items()
    }
    flat = [p for pair in params.values() for p in pair]  # weight, bias of each kind, in kind order
    bufs: dict[tuple, list[torch.Tensor | None]] = {kind: [None, None] for kind in params}
    n = labels.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            y = labels[idx]
            loss = 0.0
            for kind, (weight, bias) in params.items():
                x = inputs[kind][idx]  # (B, D)
                logits = torch.baddbmm(bias[:, None, :], x.expand(weight.shape[0], -1, -1), weight.transpose(1, 2))
                per_cell = F.cross_entropy(logits.transpose(1, 2), y.expand(weight.shape[0], -1), reduction="none")
                loss = loss + per_cell.mean(dim=1).sum()  # (L, B) -> sum of the cells' mean losses
            grads = torch.autograd.grad(loss, flat)
            lrs = [group["lr"] for group in optim.param_groups]
            with torch.no_grad():
                for k, (kind, pair) in enumerate(params.items()):
                    buf = bufs[kind]
                    for j, (p, g) in enumerate(zip(pair, grads[2 * k : 2 * k + 2], strict=True)):
                        buf[j] = g.clone() if buf[j] is None else buf[j].mul_(0.9).add_(g)
                        for slot, i in enumerate(kinds[kind]):
                            p[slot].add_(buf[j][slot], alpha=-lrs[i])
            optim.step()  # its parameters have no gradients: a no-op that lets the schedule advance
            sched.step()
    with torch.no_grad():
        for kind, (weight, bias) in params.items():
            for slot, i in enumerate(kinds[kind]):
                layer = classifiers[_name(cells[i])]
                layer.weight.copy_(weight[slot])
                layer.bias.copy_(bias[slot])


@torch.no_grad()
def evaluate_linear_grid(classifiers: dict[str, nn.Linear], cells, feats: dict) -> dict[str, dict[str, float]]:
    """{cell name: {"top1", "top5"}} on ``feats``."""
    labels = feats["labels"].long()
    out = {}
    for cell in cells:
        logits = classifiers[_name(cell)](create_linear_input(feats, cell[0], cell[1]))
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = ranked == labels[:, None]
        out[_name(cell)] = {"top1": float(hits[:, 0].float().mean()), "top5": float(hits.any(1).float().mean())}
    return out


def _subset(feats: dict, idx: torch.Tensor) -> dict:
    return {
        k: (v[idx] if isinstance(v, torch.Tensor) else None if v is None else [v[i] for i in idx.tolist()])
        for k, v in feats.items()
    }


def linear_probe(
    train: dict,
    val: dict,
    test: dict | None = None,
    n_last_blocks_list: Sequence[int] = (1, 4),
    avgpool_list: Sequence[bool] = (False, True),
    lrs: Sequence[float] = LINEAR_LRS,
    epochs: int = 10,
    batch_size: int = 128,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    num_classes: int | None = None,
) -> dict:
    """The linear-probe grid on precomputed features -> {"metrics": {...}, "details": {...}}.

    train / val / test: {cls_tokens (n, B, D), patch_mean (n, D) | None, labels (n,)} as returned by
    ``franca.eval.features.extract_linear_features``.
    """
    for name, feats in (("train", train), ("val", val)) + ((("test", test),) if test is not None else ()):
        if feats["labels"].lt(0).any():
            raise ValueError(f"linear probe: {name} split has unlabeled samples (label -1)")
    num_classes = int(num_classes or int(max(train["labels"].max(), val["labels"].max())) + 1)
    cells = _grid(train, n_last_blocks_list, avgpool_list, lrs)
    # 1) all of train -> val (DINOv2 selection on val)
    full = train_linear_grid(train, cells, num_classes, epochs, batch_size, seed)
    val_acc = evaluate_linear_grid(full, cells, val)
    best_val = max(val_acc, key=lambda k: val_acc[k]["top1"])
    # 2) hold-out selection inside train
    n = train["labels"].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, int(round(holdout_fraction * n)))
    part = train_linear_grid(_subset(train, perm[n_hold:]), cells, num_classes, epochs, batch_size, seed)
    hold_acc = evaluate_linear_grid(part, cells, _subset(train, perm[:n_hold]))
    best_hold = max(hold_acc, key=lambda k: hold_acc[k]["top1"])
    metrics = {
        "top1": val_acc[best_val]["top1"],
        "top5": val_acc[best_val]["top5"],
        "top1_holdout_selected": val_acc[best_hold]["top1"],
        "top5_holdout_selected": val_acc[best_hold]["top5"],
    }
    details = {
        "best_val_selected": best_val,
        "best_holdout_selected": best_hold,
        "val": val_acc,
        "holdout": hold_acc,
        "num_classes": num_classes,
        "epochs": epochs,
        "batch_size": batch_size,
    }
    if test is not None:
        test_acc = evaluate_linear_grid(full, cells, test)
        metrics["test_top1_val_selected"] = test_acc[best_val]["top1"]
        metrics["test_top1_holdout_selected"] = test_acc[best_hold]["top1"]
        details["test"] = test_acc
    logger.info("linear probe: %s (val-selected %s, hold-out-selected %s)", metrics, best_val, best_hold)
    return {"metrics": metrics, "details": details}
