"""Tests of the DINOv2-style backbone (spec 1.1): shapes, counts, masking, pos-embed interpolation, multi-crop."""

import pytest
import torch
import torch.nn.functional as F

from franca.models import build_backbone, vit_base, vit_giant2, vit_large, vit_small, vit_tiny
from franca.models.vision_transformer import DinoVisionTransformer

torch.set_num_threads(1)

TINY = {
    "arch": "vit_custom",
    "patch_size": 4,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 4,
    "ffn_layer": "swiglu",
    "drop_path_rate": 0.0,
    "layerscale": 1e-5,
    "img_size": 32,
    "interpolate_offset": 0.1,
    "interpolate_antialias": False,
    "attn_impl": "sdpa",
}


def small_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, ffn_layer="swiglu", layerscale=1.0)
    args.update(kw)
    return DinoVisionTransformer(**args).eval()


def test_tiny_preset_shapes_and_outputs():
    model = build_backbone(TINY).eval()
    assert model.embed_dim == 64 and len(model.blocks) == 4 and model.pos_embed.shape == (1, 65, 64)
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_features(x)
    assert out["x_norm_clstoken"].shape == (2, 64) and out["x_norm_patchtokens"].shape == (2, 64, 64)
    assert out["x_prenorm"].shape == (2, 65, 64) and out["masks"] is None
    torch.testing.assert_close(out["x_norm_clstoken"], model.norm(out["x_prenorm"])[:, 0])
    torch.testing.assert_close(model(x), out["x_norm_clstoken"])
    assert model(x, is_training=True).keys() == out.keys()
    rasa = model.forward_features(x, rasa_head=lambda t: 2 * t)
    torch.testing.assert_close(rasa["patch_token_rasa"], 2 * out["x_norm_patchtokens"])


@pytest.mark.parametrize(
    ("factory", "dims", "approx_m"),
    [(vit_tiny, (192, 12, 3), 5.6), (vit_small, (384, 12, 6), 22), (vit_base, (768, 12, 12), 86),
     (vit_large, (1024, 24, 16), 304), (vit_giant2, (1536, 40, 24), 1136)],
)  # fmt: skip
def test_factories_and_parameter_counts_on_meta(factory, dims, approx_m):
    ffn = "swiglu" if factory in (vit_base, vit_large, vit_giant2) else "mlp"
    kwargs = {} if factory is vit_giant2 else {"ffn_layer": ffn}
    with torch.device("meta"):
        model = factory(img_size=224, **kwargs)
    d, depth, heads = dims
    assert (model.embed_dim, len(model.blocks), model.num_heads, model.patch_size) == (d, depth, heads, 14)
    if ffn == "swiglu":
        h = ((int(4 * d * 2 / 3) + 7) // 8) * 8
        ffn_params = d * 2 * h + 2 * h + h * d + d
    else:
        ffn_params = d * 4 * d + 4 * d + 4 * d * d + d
    per_block = (d * 3 * d + 3 * d) + (d * d + d) + ffn_params + 4 * d + 2 * d  # attn, ffn, 2 LN, 2 LS
    embed = 3 * 14 * 14 * d + d + 257 * d + d + d  # conv, pos (16x16 + cls), cls, mask token
    expected = depth * per_block + embed + 2 * d
    n = sum(p.numel() for p in model.parameters())
    assert n == expected
    assert abs(n / 1e6 - approx_m) / approx_m < 0.02


def test_init_values():
    torch.manual_seed(0)
    model = vit_small(img_size=224, patch_size=14)
    assert torch.equal(model.mask_token, torch.zeros(1, 384))
    assert model.cls_token.abs().max() < 1e-4
    assert abs(model.pos_embed.std().item() - 0.02) < 0.001
    assert torch.equal(model.blocks[3].attn.qkv.bias, torch.zeros(3 * 384))
    assert abs(model.blocks[3].attn.qkv.weight.std().item() - 0.02) < 0.001
    assert torch.equal(model.blocks[0].ls1.gamma, torch.full((384,), 1e-5))


def test_mask_token_replaces_patches_before_pos_embed():
    model = small_vit()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    tokens = model.prepare_tokens_with_masks(x, masks)
    plain = model.prepare_tokens_with_masks(x)
    expected = model.mask_token[0] + model.pos_embed[0, 1:][[1, 5, 6]]
    torch.testing.assert_close(tokens[0, 1:][[1, 5, 6]], expected)
    keep = ~masks.flatten()
    torch.testing.assert_close(tokens[:, 1:].flatten(0, 1)[keep], plain[:, 1:].flatten(0, 1)[keep])
    torch.testing.assert_close(tokens[:, 0], plain[:, 0])


def test_pos_embed_identity_size_is_exact():
    model = small_vit()
    tokens = torch.zeros(1, 17, 32)
    assert model.interpolate_pos_encoding(tokens, 16, 16) is model.pos_embed


def test_pos_embed_interpolation_offset_orientation_and_cls():
    model = small_vit(interpolate_offset=0.1)
    with torch.no_grad():  # a field that varies along rows only: value = row index
        grid = torch.arange(4.0).reshape(4, 1, 1).expand(4, 4, 32)
        model.pos_embed[0, 1:] = grid.reshape(16, 32)
    tokens = torch.zeros(1, 1 + 3 * 2, 32)
    pos = model.interpolate_pos_encoding(tokens, 12, 8)  # 3 rows x 2 cols of patches
    assert pos.shape == (1, 7, 32)
    torch.testing.assert_close(pos[:, 0], model.pos_embed[:, 0])  # CLS not interpolated
    patch = pos[0, 1:].reshape(3, 2, 32)
    torch.testing.assert_close(patch[:, 0], patch[:, 1])  # constant along columns
    assert torch.all(patch[1:, 0, 0] > patch[:-1, 0, 0])  # increasing along rows
    # the offset path uses scale (rows + 0.1) / M, not the output size: it differs from size-based resizing
    src = model.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    by_scale = F.interpolate(src, scale_factor=(3.1 / 4, 2.1 / 4), mode="bicubic")
    torch.testing.assert_close(patch, by_scale[0].permute(1, 2, 0))
    sized = small_vit(interpolate_offset=0.0)
    with torch.no_grad():
        sized.pos_embed.copy_(model.pos_embed)
    by_size = F.interpolate(src, size=(3, 2), mode="bicubic")[0].permute(1, 2, 0)
    torch.testing.assert_close(sized.interpolate_pos_encoding(tokens, 12, 8)[0, 1:].reshape(3, 2, 32), by_size)
    assert not torch.allclose(by_size, patch)


def test_separate_multicrop_passes_equal_individual_calls():
    model = small_vit()
    g, loc = torch.randn(4, 3, 16, 16), torch.randn(6, 3, 8, 8)
    masks = torch.rand(4, 16) < 0.4
    outs = model([g, loc], masks=[masks, None], is_training=True)
    single_g, single_l = model.forward_features(g, masks), model.forward_features(loc)
    for got, ref in ((outs[0], single_g), (outs[1], single_l)):
        for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(got[key], ref[key])
    assert outs[1]["x_norm_patchtokens"].shape == (6, 4, 32)


def test_get_intermediate_layers():
    model = small_vit()
    x = torch.randn(2, 3, 16, 16)
    last = model.get_intermediate_layers(x, n=1)
    assert len(last) == 1
    torch.testing.assert_close(last[0], model.forward_features(x)["x_norm_patchtokens"])
    both = model.get_intermediate_layers(x, n=[0, 1], reshape=True, return_class_token=True)
    assert both[0][0].shape == (2, 32, 4, 4) and both[1][1].shape == (2, 32)
    torch.testing.assert_close(both[1][0].flatten(2).transpose(1, 2), last[0])
    raw = model.get_intermediate_layers(x, n=1, norm=False)
    torch.testing.assert_close(raw[0], model.forward_features(x)["x_prenorm"][:, 1:])
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, n=[5])


def test_build_backbone_errors_and_drop_path_override():
    with pytest.raises(KeyError, match="arch"):
        build_backbone({"patch_size": 4})
    with pytest.raises(ValueError, match="model.arch"):
        build_backbone({"arch": "vit_huge"})
    with pytest.raises(KeyError, match="embed_dim"):
        build_backbone({"arch": "vit_custom", "depth": 2, "num_heads": 2})
    with pytest.raises(ValueError, match="ffn_layer"):
        build_backbone({**TINY, "ffn_layer": "moe"})
    student = build_backbone({**TINY, "drop_path_rate": 0.2, "ffn_layer": "swiglufused"})
    teacher = build_backbone({**TINY, "drop_path_rate": 0.2}, drop_path_rate=0.0)
    assert all(b.drop_path1.drop_prob == 0.2 for b in student.blocks)  # uniform rate
    assert all(b.drop_path1.drop_prob == 0.0 for b in teacher.blocks)
    with torch.device("meta"):
        base = build_backbone({"arch": "vit_base", "ffn_layer": "mlp", "img_size": 28, "patch_size": 14})
    assert base.embed_dim == 768 and base.blocks[0].mlp.fc1.out_features == 3072
