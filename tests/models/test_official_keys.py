"""Loading a state dict in the official Franca/DINOv2 naming (block_chunks, prefixes) gives identical outputs."""

import pytest
import torch

from franca.layers import MRLDINOHead
from franca.models.official_keys import convert_official_state_dict, load_official_backbone, split_official_state_dict
from franca.models.vision_transformer import DinoVisionTransformer

torch.set_num_threads(1)

DEPTH, CHUNKS = 8, 4


def make_model(seed):
    torch.manual_seed(seed)
    return DinoVisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=DEPTH, num_heads=2, ffn_layer="swiglu", layerscale=0.3
    ).eval()


def to_official_chunked(state, chunks, prefix):
    """Independent re-implementation of the official layout: blocks grouped in BlockChunks that keep their global
    index ("blocks.<chunk>.<global i>.") plus a checkpoint prefix."""
    size = DEPTH // chunks
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            i = int(parts[1])
            parts = ["blocks", str(i // size), str(i)] + parts[2:]
        out[prefix + ".".join(parts)] = value.clone()
    return out


def test_block_chunked_teacher_checkpoint_loads_to_identical_outputs():
    ref = make_model(0)
    official = to_official_chunked(ref.state_dict(), CHUNKS, "backbone.")
    assert "backbone.blocks.3.7.mlp.w12.weight" in official and "backbone.blocks.0.0.ls1.gamma" in official
    head = MRLDINOHead(32, 64, hidden_dim=16, bottleneck_dim=8)
    official.update({f"dino_head.{k}": v for k, v in head.state_dict().items()})
    official["rasa_head.pos_layers.0.weight"] = torch.zeros(2, 32)
    checkpoint = {"teacher": {f"module.{k}": v for k, v in official.items()}}

    fresh = make_model(1)
    x = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(fresh(x), ref(x))
    result = load_official_backbone(fresh, checkpoint)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh(x), ref(x))
    assert torch.equal(fresh.get_intermediate_layers(x, n=2)[0], ref.get_intermediate_layers(x, n=2)[0])

    parts = split_official_state_dict(checkpoint)
    assert set(parts) == {"backbone", "dino_head", "rasa_head"}
    head2 = MRLDINOHead(32, 64, hidden_dim=16, bottleneck_dim=8)
    head2.load_state_dict(parts["dino_head"])
    z = torch.randn(3, 32)
    assert all(torch.equal(a, b) for a, b in zip(head(z), head2(z), strict=True))


def test_unchunked_hub_state_dict_and_parametrized_weight_norm_keys():
    ref = make_model(0)
    converted = convert_official_state_dict(ref.state_dict())
    assert converted.keys() == ref.state_dict().keys()
    head = MRLDINOHead(32, 64, hidden_dim=16, bottleneck_dim=8)
    renamed = {}
    for k, v in head.state_dict().items():
        k = k.replace("weight_g", "parametrizations.weight.original0").replace(
            "weight_v", "parametrizations.weight.original1"
        )
        renamed[f"teacher.ibot_head.{k}"] = v
    parts = split_official_state_dict(renamed)
    assert parts["ibot_head"].keys() == head.state_dict().keys()


def test_register_tokens_are_rejected():
    state = dict(make_model(0).state_dict())
    state["register_tokens"] = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError, match="register_tokens"):
        convert_official_state_dict(state)
