"""DINO / iBOT / KoLeo losses against hand-computed values (spec 2.3, 2.4; quirk Q3)."""

import math

import pytest
import torch

from franca.loss import KoLeoLoss, MRLDINOLoss, MRLiBOTPatchLoss, SinkhornKnopp, dino_loss_terms

torch.set_num_threads(1)


def ce(target, logits, temp=0.1):
    """-sum_k t_k log softmax(s / temp)_k with Python floats."""
    z = [v / temp for v in logits]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return -sum(t * (v - lse) for t, v in zip(target, z, strict=True))


def test_loss_term_count():
    assert dino_loss_terms(2, 8) == 18 and dino_loss_terms(2, 4) == 10
    assert dino_loss_terms(2, 0) == 3  # the official max(n_g n_l, 1)


def test_mrl_dino_loss_against_hand_computation():
    torch.manual_seed(0)
    b, n_l, ks = 2, 3, (3, 5)
    student_g = [torch.randn(2 * b, k) for k in ks]
    student_l = [torch.randn(n_l * b, k) for k in ks]
    targets = [torch.softmax(torch.randn(2 * b, k), -1) for k in ks]  # swapped order: row r pairs with student r
    out = MRLDINOLoss(0.1)(student_g, student_l, targets, n_local_crops=n_l)
    n_terms = 2 * 1 + 2 * n_l
    local = glob = 0.0
    for level in range(2):
        s_g, s_l, t = student_g[level].tolist(), student_l[level].tolist(), targets[level].tolist()
        for j in range(n_l):  # local crop j vs each global teacher crop g, mean over the batch
            for g in range(2):
                local += sum(ce(t[g * b + i], s_l[j * b + i]) for i in range(b)) / b
        # global: student crop 1 vs teacher crop 2 (row-aligned after the swap) and vice versa
        pairs = [sum(ce(t[c * b + i], s_g[c * b + i]) for i in range(b)) / b for c in range(2)]
        glob += sum(pairs)
    assert out["local"].item() == pytest.approx(local / n_terms, rel=1e-5)
    assert out["global"].item() == pytest.approx(glob / n_terms, rel=1e-5)
    assert len(out["local_levels"]) == 2
    assert sum(v.item() for v in out["global_levels"]) == pytest.approx(out["global"].item(), rel=1e-6)


def test_mrl_ibot_loss_against_hand_computation():
    torch.manual_seed(1)
    ks = (4, 6)
    weights = torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3])  # image 0: 2 masked patches, image 1: 3
    student = [torch.randn(5, k) for k in ks]
    targets = [torch.softmax(torch.randn(5, k), -1) for k in ks]
    out = MRLiBOTPatchLoss(0.1)(student, targets, weights, n_images=4)  # 2 masked + 2 unmasked global crops
    expected = [
        sum(w * ce(t, s) for w, t, s in zip(weights.tolist(), targets[i].tolist(), student[i].tolist(), strict=True))
        / 4
        for i in range(2)
    ]
    assert [v.item() for v in out["levels"]] == pytest.approx(expected, rel=1e-5)
    assert out["loss"].item() == pytest.approx(sum(expected), rel=1e-5)


def test_ibot_sinkhorn_padding_rows_quirk():
    torch.manual_seed(2)

    w, bias = torch.randn(3, 4) * 0.1, torch.randn(4) * 0.1

    def head(x):  # a 2-level "head" with a bias, so zero rows get a non-trivial shared logit vector
        return (x @ w + bias, x[:, :2] * 0.2 - torch.tensor([0.1, -0.05]))

    tokens = torch.randn(5, 3)
    sk = SinkhornKnopp()
    faithful = MRLiBOTPatchLoss(sk_padding_rows=True).teacher_targets(head, tokens, 9, 0.05, sk, torch.tensor(5.0))
    clean = MRLiBOTPatchLoss(sk_padding_rows=False).teacher_targets(head, tokens, 9, 0.05, sk, torch.tensor(5.0))
    padded = torch.cat([tokens, torch.zeros(4, 3)])
    for level, logits in enumerate(head(padded)):
        assert faithful[level].shape == (5, logits.shape[1])
        torch.testing.assert_close(faithful[level], sk.ibot_targets(logits, 0.05, 5.0)[:5])
        torch.testing.assert_close(clean[level], sk.ibot_targets(logits[:5], 0.05, 5.0))
        assert not torch.allclose(faithful[level], clean[level])
    with pytest.raises(ValueError, match="upperbound"):
        MRLiBOTPatchLoss().teacher_targets(head, tokens, 3, 0.05, sk, 5.0)


def test_koleo_antipodal_and_hand_computed():
    koleo = KoLeoLoss()
    pair = torch.tensor([[3.0, 0.0], [-1.0, 0.0]])
    assert koleo(pair).item() == pytest.approx(-math.log(2), abs=1e-6)
    # three unit points at 0, 90 and 180 degrees (scaled: normalisation happens inside)
    pts = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
    d = math.sqrt(2)  # every point's nearest neighbour is the 90-degree one at distance sqrt(2)
    assert koleo(pts).item() == pytest.approx(-math.log(d), abs=1e-6)
    x = torch.randn(6, 4, requires_grad=True)
    koleo(x).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        koleo(torch.randn(1, 4))
