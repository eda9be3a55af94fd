"""RASAHead (spec 5, decompose_pos_2D): projections against an independent matrix reference, layouts, files."""

import pytest
import torch

from franca.rasa import RASAHead, decompose_pos
from franca.rasa.report import removed_energy_dims


def _projector(weight: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the row span of weight (k, D), via the pseudo-inverse: U^T (U U^T)^-1 U."""
    u = weight.double()
    return u.T @ torch.linalg.inv(u @ u.T) @ u


def test_decompose_matches_the_pseudo_inverse_projector():
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(2, 12, generator=g), torch.randn(5, 7, 12, generator=g)
    x_pos, x_no_pos = decompose_pos(x, weight)
    expected_pos = (x.double() @ _projector(weight)).float()
    # tolerance: float32 against a float64 reference: float32 rounding of O(1) values (length-12 dot products, a 2 x 2
    # Gram matrix of random rows, well conditioned); 1e-5 = 84 units of 1.2e-7 (measured: 1.4% of the tolerance, also
    # with ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE)
    torch.testing.assert_close(x_pos, expected_pos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_pos + x_no_pos, x)
    assert (x_no_pos @ weight.T).abs().max() < 1e-4  # nothing left along either row
    assert (x_pos * x_no_pos).sum(-1).abs().max() < 1e-4  # orthogonal split


def test_head_applies_projections_in_order_and_pos_pred_flag():
    g = torch.Generator().manual_seed(1)
    d = 10
    w1, w2 = torch.randn(2, d, generator=g), torch.randn(2, d, generator=g)  # not orthogonal to each other
    head = RASAHead(d)
    head.add_projection(w1)
    head.add_projection(w2)
    x = torch.randn(4, 3, d, generator=g)
    eye = torch.eye(d, dtype=torch.float64)
    m = (eye - _projector(w1)) @ (eye - _projector(w2))  # row-vector convention: x (I - P1) (I - P2)
    torch.testing.assert_close(head(x), (x.double() @ m).float(), atol=1e-5, rtol=1e-5)
    skip_last = (x.double() @ (eye - _projector(w1))).float()
    torch.testing.assert_close(head(x, use_pos_pred=False), skip_last, atol=1e-5, rtol=1e-5)
    x_pos, x_no_pos = head.decompose(x)
    torch.testing.assert_close(x_pos + x_no_pos, x)
    # order matters for non-orthogonal planes
    swapped = RASAHead(d, torch.stack([w2, w1]))
    assert (swapped(x) - head(x)).abs().max() > 1e-3


def test_orthogonal_planes_remove_exactly_two_dims_each():
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(2)))
    head = RASAHead(16, torch.stack([q[:2], q[2:4], q[4:6]]) * 3.0)
    assert removed_energy_dims(head) == pytest.approx(6.0, abs=1e-4)
    assert removed_energy_dims(RASAHead(16)) == pytest.approx(0.0)


def test_state_dict_roundtrip_resizes_buffer_and_dtype():
    head = RASAHead(8, torch.randn(3, 2, 8))
    fresh = RASAHead(8)  # zero projections
    fresh.load_state_dict(head.state_dict())
    assert fresh.n_projections == 3
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    out = fresh(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, head(x))
    with pytest.raises(ValueError, match="D = 8"):
        head(torch.randn(2, 9))


def test_files_and_official_layout(tmp_path):
    head = RASAHead(6, torch.randn(4, 2, 6), use_pos_pred=False)
    head.save(tmp_path / "rasa.pth", rounds=4)
    loaded = RASAHead.load(tmp_path / "rasa.pth")
    assert loaded.use_pos_pred is False and loaded.n_projections == 4
    torch.testing.assert_close(loaded.projections, head.projections)
    official = head.to_official_state_dict()
    assert sorted(official) == ["pos_pred.weight"] + [f"pre_pos_layers.{i}.weight" for i in range(3)]
    torch.save({f"head.{k}": v for k, v in official.items()}, tmp_path / "hub.pth")
    hub = RASAHead.load(tmp_path / "hub.pth")
    assert hub.use_pos_pred is True  # the official forward default
    torch.testing.assert_close(hub.projections, head.projections)
    torch.save({"something": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        RASAHead.load(tmp_path / "bad.pth")


def test_head_is_usable_as_forward_features_callable():
    class StandIn(torch.nn.Module):
        def forward_features(self, x, masks=None, rasa_head=None):
            tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
            out = {"x_norm_clstoken": tokens.mean(1), "x_norm_patchtokens": tokens}
            if rasa_head is not None:
                out["patch_token_rasa"] = rasa_head(tokens)
            return out

    head = RASAHead(3, torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]))
    out = StandIn().forward_features(torch.randn(2, 3, 4, 4), rasa_head=head)
    assert out["patch_token_rasa"][..., :2].abs().max() < 1e-6
    torch.testing.assert_close(out["patch_token_rasa"][..., 2], out["x_norm_patchtokens"][..., 2])
