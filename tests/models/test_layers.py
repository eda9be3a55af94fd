"""Unit tests of franca.layers (spec 1.1 blocks, 2.1 heads): shapes, init, and equality with hand-written maths."""

import math

import pytest
import torch
import torch.nn.functional as F

from franca.layers import (
    Attention,
    Block,
    DINOHead,
    DropPath,
    LayerScale,
    MRLDINOHead,
    PatchEmbed,
    SwiGLUFFN,
    nesting_dims,
    swiglu_hidden_dim,
)
from franca.layers.drop_path import batch_subset_residual

torch.set_num_threads(1)


def test_patch_embed_is_a_row_major_linear_map_of_patches():
    torch.manual_seed(0)
    pe = PatchEmbed(img_size=12, patch_size=4, in_chans=3, embed_dim=5)
    x = torch.randn(2, 3, 8, 12)
    out = pe(x)
    assert out.shape == (2, 2 * 3, 5)
    w = pe.proj.weight.reshape(5, -1)  # (D, C*P*P)
    for row in range(2):
        for col in range(3):
            patch = x[:, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].reshape(2, -1)
            expected = patch @ w.t() + pe.proj.bias
            torch.testing.assert_close(out[:, row * 3 + col], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        pe(torch.randn(1, 3, 10, 12))


def test_sdpa_and_explicit_attention_agree_and_match_a_per_head_loop():
    torch.manual_seed(0)
    sdpa = Attention(16, 4, attn_impl="sdpa")
    explicit = Attention(16, 4, attn_impl="explicit")
    explicit.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 7, 16)
    a, b = sdpa(x), explicit(x)
    # tolerance: the same sums (dot products of length <= 16, a softmax over 7 keys) in another order; float32
    # recursive summation errs by <= n EPS32 of the summed magnitudes, O(1) here: rtol 1e-5 = 84 units covers n <= 16
    # with a 5x margin (measured: 4% of the tolerance, also with ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # independent reference: a loop over heads with math.sqrt scaling
    q, k, v = (x @ sdpa.qkv.weight.t() + sdpa.qkv.bias).split(16, dim=-1)
    heads = []
    for h in range(4):
        sl = slice(4 * h, 4 * h + 4)
        att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(att @ v[..., sl])
    ref = torch.cat(heads, dim=-1) @ sdpa.proj.weight.t() + sdpa.proj.bias
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attn_impl"):
        Attention(16, 4, attn_impl="flash")


def test_layer_scale_init_and_swiglu_hidden_sizes():
    ls = LayerScale(6)
    assert torch.equal(ls.gamma, torch.full((6,), 1e-5))
    assert [swiglu_hidden_dim(d) for d in (768, 1024, 1536)] == [2048, 2736, 4096]
    torch.manual_seed(0)
    ffn = SwiGLUFFN(24)
    h = swiglu_hidden_dim(24)  # int(96 * 2/3) = 64 -> 64
    assert ffn.w12.weight.shape == (2 * h, 24) and ffn.w3.weight.shape == (24, h)
    x = torch.randn(5, 24)
    w1, w2 = ffn.w12.weight[:h], ffn.w12.weight[h:]
    b1, b2 = ffn.w12.bias[:h], ffn.w12.bias[h:]
    ref = ((x @ w1.t() + b1) * torch.sigmoid(x @ w1.t() + b1) * (x @ w2.t() + b2)) @ ffn.w3.weight.t() + ffn.w3.bias
    torch.testing.assert_close(ffn(x), ref, rtol=1e-5, atol=1e-6)


def test_drop_path_per_sample_scaling():
    torch.manual_seed(0)
    dp = DropPath(0.25)
    x = torch.ones(4000, 3)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    kept = y[:, 0] != 0
    assert torch.all((y[kept] - 1 / 0.75).abs() < 1e-6)  # kept samples rescaled by 1 / (1 - p)
    assert torch.all(y[~kept] == 0) and torch.all((y == 0).all(1) | (y != 0).all(1))  # whole samples
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_batch_subset_residual_touches_floor_b_one_minus_p_samples():
    torch.manual_seed(0)
    x = torch.zeros(10, 2, 3)
    out = batch_subset_residual(x, lambda t: torch.ones_like(t), p=0.35)  # subset = int(10 * 0.65) = 6
    touched = (out != 0).all(-1).all(-1)
    assert touched.sum() == 6
    torch.testing.assert_close(out[touched], torch.full((6, 2, 3), 10 / 6))


def test_block_equals_pre_norm_composition():
    torch.manual_seed(0)
    blk = Block(16, 4, ffn_layer="swiglu", layerscale=0.5, drop_path=0.3).eval()
    x = torch.randn(2, 5, 16)
    y = x + 0.5 * blk.attn(F.layer_norm(x, (16,), blk.norm1.weight, blk.norm1.bias, eps=1e-6))
    y = y + 0.5 * blk.mlp(F.layer_norm(y, (16,), blk.norm2.weight, blk.norm2.bias, eps=1e-6))
    torch.testing.assert_close(blk(x), y)
    assert blk.norm1.eps == 1e-6 and blk.drop_path1.drop_prob == blk.drop_path2.drop_prob == 0.3


def test_dino_head_l2_normalises_and_returns_one_level():
    torch.manual_seed(0)
    head = DINOHead(16, 40, hidden_dim=32, bottleneck_dim=8, nlayers=3)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert torch.equal(head.last_layer.weight_g, torch.ones(40, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))
    x = torch.randn(6, 16)
    (out,) = head(x)
    z = F.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.weight_v
    torch.testing.assert_close(out, z @ (v / v.norm(dim=1, keepdim=True)).t())
    assert set(head.state_dict()) >= {"mlp.0.weight", "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v"}


def test_mrl_head_levels_projection_mode():
    torch.manual_seed(0)
    assert nesting_dims(768) == [48, 96, 192, 384, 768]
    assert nesting_dims(64, 3) == [16, 32, 64]
    head = MRLDINOHead(64, 256, hidden_dim=32, bottleneck_dim=12, nlayers=3)
    assert head.nesting_list == [4, 8, 16, 32, 64] and head.out_dims == (16, 32, 64, 128, 256)
    x = torch.randn(5, 64)
    outs = head(x)
    assert isinstance(outs, tuple) and [o.shape for o in outs] == [(5, k) for k in head.out_dims]
    for i, d in enumerate(head.nesting_list):
        proj = head.matryoshka_projections[i]
        assert proj.weight.shape == (d, 64) and torch.equal(proj.bias, torch.zeros(d))
        assert isinstance(head.mlps[i][-1], torch.nn.GELU)  # GELU after the bottleneck (Q2)
        h = head.mlps[i](x @ proj.weight.t() + proj.bias)  # no L2 normalisation (Q2)
        torch.testing.assert_close(outs[i], h @ head.last_layers[i].weight.t())
    names = [n for n, _ in head.named_parameters() if "last_layer" in n]
    assert len(names) == 10  # weight_g and weight_v of every level
    std = torch.cat([m.weight.flatten() for m in head.modules() if isinstance(m, torch.nn.Linear)]).std()
    assert abs(std.item() - 0.02) < 0.002


def test_mrl_head_slice_modes_only_see_leading_coordinates():
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    x2 = x.clone()
    x2[:, 2:] += 1.0  # changes everything but the first D/16 = 2 coordinates
    for mode in ("slice", "slice_projection"):
        head = MRLDINOHead(32, 64, hidden_dim=16, bottleneck_dim=8, mode=mode)
        torch.testing.assert_close(head(x)[0], head(x2)[0])
        assert not torch.allclose(head(x)[1], head(x2)[1])
    proj = MRLDINOHead(32, 64, hidden_dim=16, bottleneck_dim=8, mode="projection")
    assert not torch.allclose(proj(x)[0], proj(x2)[0])
    with pytest.raises(ValueError, match="mrl_mode"):
        MRLDINOHead(32, 64, mode="nested")


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_vit_b_mrl_head_parameter_counts_on_meta_device():
    """Spec 2.1: DINO MRL head ~127 M (98 M in the last layers), iBOT MRL head ~93 M, DINOv2 head ~57 M."""
    with torch.device("meta"):
        dino = MRLDINOHead(768, 131072, hidden_dim=2048, bottleneck_dim=384)
        ibot = MRLDINOHead(768, 131072, hidden_dim=2048, bottleneck_dim=256)
        single = DINOHead(768, 131072, hidden_dim=2048, bottleneck_dim=384)
        sliced = MRLDINOHead(768, 131072, hidden_dim=2048, bottleneck_dim=384, mode="slice")
    dims = [48, 96, 192, 384, 768]
    ks = [8192, 16384, 32768, 65536, 131072]
    assert dino.out_dims == tuple(ks)

    def closed_form(bott, projection=True):
        proj = sum(768 * d + d for d in dims) if projection else 0
        mlps = sum((d + 1) * 2048 + 2049 * 2048 + 2049 * bott for d in dims)
        return proj + mlps + sum(k * (bott + 1) for k in ks)

    assert _count(dino) == closed_form(384) and _count(ibot) == closed_form(256)
    assert _count(sliced) == closed_form(384, projection=False)
    assert abs(_count(dino) / 1e6 - 127) < 1 and abs(_count(dino.last_layers) / 1e6 - 98) < 1
    assert abs(_count(ibot) / 1e6 - 93) < 1 and abs(_count(single) / 1e6 - 57) < 1
