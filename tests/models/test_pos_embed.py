"""Offline pos_embed resize (spec 4, stage 2 step 1): identity, smoothness, CLS kept, antialias, checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from franca.models.pos_embed import resize_checkpoint_file, resize_checkpoint_pos_embed, resize_pos_embed


def _smooth_embed(side: int, dim: int = 6) -> torch.Tensor:
    """(1, 1 + side^2, dim): channel d is a smooth function of the patch centre (u, v) = ((j+.5)/M, (i+.5)/M)."""
    centres = (torch.arange(side, dtype=torch.float64) + 0.5) / side
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    channels = [_analytic(u, v, d) for d in range(dim)]
    patch = torch.stack(channels, dim=-1).reshape(1, side * side, dim)
    cls = torch.full((1, 1, dim), 7.0, dtype=torch.float64)
    return torch.cat([cls, patch], dim=1).float()


def _analytic(u: torch.Tensor, v: torch.Tensor, d: int) -> torch.Tensor:
    return torch.sin(math.pi * (u + 0.3 * d)) * torch.cos(0.5 * math.pi * v) + 0.2 * d * u - 0.1 * v


def test_same_grid_returns_input_unchanged():
    pe = torch.randn(1, 1 + 8 * 8, 16)
    out = resize_pos_embed(pe, 8)
    assert torch.equal(out, pe)
    assert out.data_ptr() != pe.data_ptr()  # a copy, safe to modify


@pytest.mark.parametrize("src,dst,tol", [(8, 16, 2e-3), (16, 37, 2e-3), (12, 8, 2e-2)])
def test_smooth_embedding_stays_close_to_the_analytic_function(src, dst, tol):
    out = resize_pos_embed(_smooth_embed(src), dst)
    expected = _smooth_embed(dst)
    assert out.shape == (1, 1 + dst * dst, 6)
    torch.testing.assert_close(out[:, :1], expected[:, :1], rtol=0, atol=0)  # CLS kept exactly
    # distance of each new patch centre to the border, in source patches: bicubic clamps within ~1.5 of it
    centre = (torch.arange(dst) + 0.5) / dst * src
    margin = torch.minimum(centre, src - centre)
    interior = torch.minimum(margin[:, None], margin[None]) >= 1.5
    err = (out[0, 1:] - expected[0, 1:]).abs().reshape(dst, dst, -1).amax(-1)
    assert err[interior].max() < tol, float(err[interior].max())  # (downsampling: antialias filter is wider)
    assert err.max() < 0.08, float(err.max())
    # the pixel-centre convention matters: align_corners=True would be off by > 0.05 in the interior
    patch = _smooth_embed(src)[:, 1:].reshape(1, src, src, -1).permute(0, 3, 1, 2)
    corners = F.interpolate(patch, size=(dst, dst), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    assert (corners[0] - expected[0, 1:].reshape(dst, dst, -1)).abs().amax(-1)[interior].max() > 0.05


def test_antialias_smooths_when_downsampling():
    side = 24  # -> 8: every new patch covers 3 old ones, a period-3 pattern averages out
    stripes = torch.cos(2 * math.pi * torch.arange(side) / 3).expand(side, side)  # (24, 24), values 1, -.5, -.5
    pe = torch.cat([torch.zeros(1, 1, 1), stripes.reshape(1, side * side, 1)], dim=1)
    smooth = resize_pos_embed(pe, 8, antialias=True)[0, 1:]
    aliased = resize_pos_embed(pe, 8, antialias=False)[0, 1:]
    assert smooth.abs().max() < 0.15, float(smooth.abs().max())  # filtered: near 0 (0.12 measured at the border)
    torch.testing.assert_close(aliased, torch.full_like(aliased, -0.5))  # sampling hits column 3i+1: a fake DC


def test_non_square_target_and_bad_inputs():
    pe = torch.randn(1, 1 + 4 * 4, 3)
    assert resize_pos_embed(pe, (6, 10)).shape == (1, 61, 3)
    with pytest.raises(ValueError, match="square grid"):
        resize_pos_embed(torch.randn(1, 1 + 15, 3), 4)
    with pytest.raises(ValueError, match="shape"):
        resize_pos_embed(torch.randn(17, 3), 4)


def test_checkpoint_helpers(tmp_path):
    sd = {"backbone.pos_embed": _smooth_embed(8), "backbone.cls_token": torch.randn(1, 1, 6)}
    out = resize_checkpoint_pos_embed(sd, "backbone.pos_embed", 16)
    assert out["backbone.pos_embed"].shape == (1, 257, 6)
    assert out["backbone.cls_token"] is sd["backbone.cls_token"]
    assert sd["backbone.pos_embed"].shape == (1, 65, 6)  # input untouched
    with pytest.raises(KeyError, match="backbone.pos_embed"):
        resize_checkpoint_pos_embed({"pos_embed": torch.randn(1, 5, 2)}, "backbone.pos_embed", 4)

    src, dst = tmp_path / "ckpt.pth", tmp_path / "out" / "ckpt.pth"
    torch.save({"format": "franca-ckpt-v1", "teacher": sd, "student": dict(sd), "iteration": 3}, src)
    resize_checkpoint_file(src, dst, 16)
    loaded = torch.load(dst, weights_only=True)
    assert loaded["iteration"] == 3
    for part in ("teacher", "student"):
        torch.testing.assert_close(loaded[part]["backbone.pos_embed"], out["backbone.pos_embed"])
