"""The post's ViT: parameter counts, interface, input checks, a plain attention reference, checkpoint loading,
and parity with the original code's outputs on the published checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from gevit_lib.hub import IncompatibleCheckpointError
from gevit_lib.models.vit import VisionTransformer, build_vit, from_original_state_dict, img_to_patch

VIT_CHECKPOINTS = ("vit_rotmnist", "vit_mnist", "vit_rotmnist_10pct")


def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(embed_dim=16, hidden_dim=32, num_heads=2, num_layers=2, patch_size=4, num_channels=1,
                num_patches=49, num_classes=10, dropout=0.1)
    return VisionTransformer(**{**args, **kw}).eval()


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_parameter_counts() -> None:
    assert sum(p.numel() for p in build_vit("mnist").parameters()) == 503_178
    assert sum(p.numel() for p in build_vit("pcam").parameters()) == 521_794


def test_original_key_names() -> None:
    keys = list(build_vit("mnist").state_dict())
    assert len(keys) == 80
    assert keys[:4] == ["cls_token", "pos_embedding", "input_layer.weight", "input_layer.bias"]
    assert "transformer.5.attn.in_proj_weight" in keys and "transformer.0.linear.3.bias" in keys
    assert keys[-4:] == ["mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight", "mlp_head.1.bias"]


def test_interface_consistency() -> None:
    model = tiny_vit()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (3, 50, 16)
        emb = model.embed(x)
        assert torch.equal(emb, tokens[:, 0])
        assert torch.equal(model.forward_head(tokens, pre_logits=True), emb)
        logits = model(x)
        assert logits.shape == (3, 10)
        torch.testing.assert_close(model.get_classifier()(emb), logits, rtol=0, atol=0)


def test_img_to_patch_layout() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = img_to_patch(x, 4)
    assert p.shape == (2, 4, 48)
    # patch 1 = top-right block, flattened channel-first then rows then columns
    torch.testing.assert_close(p[1, 1], x[1, :, 0:4, 4:8].reshape(-1))


@pytest.mark.parametrize("shape,match", [((2, 3, 28, 28), "channel"), ((2, 1, 32, 32), "image size"),
                                         ((2, 1, 28, 30), "image size"), ((1, 28, 28), r"\[B, C, H, W\]")])
def test_input_validation(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_vit()(torch.randn(*shape))


def _reference_forward(model: VisionTransformer, x: Tensor) -> Tensor:
    """Plain sequence-first re-statement of the original forward with explicit softmax attention."""
    b = x.shape[0]
    tok = model.input_layer(img_to_patch(x, model.patch_size))
    tok = torch.cat([model.cls_token.repeat(b, 1, 1), tok], 1) + model.pos_embedding
    h = tok.transpose(0, 1)  # [L, B, D] like the original
    for blk in model.transformer:
        a = blk.layer_norm_1(h)
        mha = blk.attn
        q, k, v = torch.nn.functional.linear(a, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
        nh, d = mha.num_heads, mha.embed_dim // mha.num_heads

        def heads(t: Tensor) -> Tensor:
            return t.reshape(t.shape[0], b, nh, d).permute(1, 2, 0, 3)  # [B, nh, L, d]

        att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d), -1) @ heads(v)
        att = att.permute(2, 0, 1, 3).reshape(h.shape)
        h = h + mha.out_proj(att)
        h = h + blk.linear(blk.layer_norm_2(h))
    return model.mlp_head(h[0])


def test_matches_plain_reference_float64() -> None:
    model = tiny_vit().double()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        ref = _reference_forward(model, x)
        assert rel(model(x), ref) < 1e-12
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            assert rel(model(x), ref) < 1e-12
        finally:
            torch.backends.mha.set_fastpath_enabled(True)


def test_state_dict_round_trip() -> None:
    model = tiny_vit()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    args = dict(embed_dim=16, hidden_dim=32, num_heads=2, num_layers=2)
    loaded = from_original_state_dict(state, preset="mnist", **args).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(IncompatibleCheckpointError, match="input_layer.weight"):
        from_original_state_dict(state, preset="pcam", **args)
    with pytest.raises(ValueError, match="unknown ViT preset"):
        build_vit("cifar")
    with pytest.raises(TypeError, match="unknown VisionTransformer arguments"):
        build_vit("mnist", depth=3)


def test_train_mode_dropout_and_grad() -> None:
    model = tiny_vit().train()
    x = torch.randn(4, 1, 28, 28)
    out = model(x)
    out.sum().backward()
    assert model.cls_token.grad is not None and model.pos_embedding.grad is not None


# ---- published checkpoints and parity (need ../shared) ----------------------------------------------------------


def test_layout_matches_original(shared_dir: Path) -> None:
    layouts = json.loads((shared_dir / "reference/checkpoints/state_dict_layouts.json").read_text())
    for name in VIT_CHECKPOINTS:
        original = {k: tuple(v[0]) for k, v in layouts[f"{name}.pt"].items()}
        ours = {k: tuple(v.shape) for k, v in build_vit("mnist").state_dict().items()}
        assert original == ours


@pytest.mark.parametrize("name", VIT_CHECKPOINTS)
def test_parity_with_original(shared_dir: Path, name: str) -> None:
    from gevit_lib.models import load_published

    ref = torch.load(shared_dir / f"reference/parity/{name}.pt", weights_only=True)
    model = load_published(name)
    assert isinstance(model, VisionTransformer) and not model.training
    x = ref["inputs"]
    with torch.no_grad():
        assert rel(model(x), ref["logits_f32"]) < 1e-5
        assert rel(model.embed(x), ref["cls_f32"]) < 1e-5
        model.double()
        assert rel(model(x.double()), ref["logits_f64"]) < 1e-5
        assert rel(model.embed(x.double()), ref["cls_f64"]) < 1e-5
        assert torch.equal(model(x.double()).argmax(1), ref["logits_f64"].argmax(1))
