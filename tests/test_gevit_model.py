"""GE-ViT models: preset parameter counts, exact invariance/equivariance for every group, fast == plain, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from gevit_lib.groups import GROUP_NAMES, get_group
from gevit_lib.hub import IncompatibleCheckpointError
from gevit_lib.models.gevit import GEViT, build_gevit, from_original_state_dict

# parameter counts of the original code's models (instantiated there)
PARAMS = {
    ("rotmnist", "z2", 10): 44_368, ("rotmnist", "p4", 10): 44_428, ("rotmnist", "p4m", 10): 44_508,
    ("rotmnist", "p8", 10): 44_508, ("rotmnist", "p12", 10): 44_588, ("rotmnist", "p4", 2): 44_268,
    ("rotmnist", "p4m", 2): 44_348, ("pcam", "p4", None): 207_034, ("pcam", "p4m", None): 207_178,
    ("pcam", "p8", None): 207_178, ("cifar10", "mz2", None): 3_001_808, ("cifar10", "p4", None): 3_002_128,
    ("cifar10", "p4m", None): 3_002_768,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def tiny(group: str, attention: str = "local", **kw) -> GEViT:
    """lift -> block (crop 1) -> max-pool -> block -> classifier; local 8x8 (P = 3), global 6x6."""
    size = 8 if attention == "local" else 6
    opts = dict(num_channels=8, num_heads=1, block_sizes=(1, 1), crop_per_layer=(1, 0), image_size=size,
                num_classes=3, attention_dropout=0.0, value_dropout=0.0)
    opts.update(kw)
    torch.manual_seed(0)
    model = build_gevit("rotmnist", group, patch_size=3, attention=attention, **opts)
    for p in model.parameters():  # random weights, including the (zero-initialised) biases
        p.data.normal_(0.0, 0.4)
    for layer in model.attention_layers()[1:]:  # a group term that matters
        layer.pos.group_embedding.weight.data.normal_(0.0, 3.0)
    return model.double().eval()


def symmetries(group_name: str) -> list[tuple[str, int]]:
    group = get_group(group_name)
    out = [(f"rot90 k={k}", group.rot90_element(k)) for k in (1, 2, 3)] if group.n_rotations % 4 == 0 else []
    return out + ([("flip W", group.flip_element())] if group.mirror else [])


@pytest.mark.parametrize("key", list(PARAMS))
def test_parameter_counts_match_the_original(key: tuple[str, str, int | None]) -> None:
    preset, group, classes = key
    model = build_gevit(preset, group, num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[key]


@pytest.mark.parametrize("attention", ["local", "global"])
@pytest.mark.parametrize("group_name", GROUP_NAMES)
def test_corrected_models_are_exactly_invariant_and_equivariant(group_name: str, attention: str) -> None:
    model = tiny(group_name, attention)
    group = model.group
    x = torch.randn(2, 1, model.config.image_size, model.config.image_size, dtype=torch.float64)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        logits = model.pool(feats[-1])
        for _, t in symmetries(group_name):
            feats_t = model.forward_intermediates(group.act_on_image(x, t))
            assert rel_err(model.pool(feats_t[-1]), logits) < 1e-9
            for f, f_t in zip(feats, feats_t):
                assert rel_err(f_t, group.act_on_group_signal(f, t, side="right")) < 1e-9


def _invariance_errors(model: GEViT, x: torch.Tensor) -> list[float]:
    with torch.no_grad():
        logits = model(x)
        return [rel_err(model(model.group.act_on_image(x, t)), logits) for _, t in symmetries(model.group.name)]


def test_reference_table_breaks_p4m() -> None:
    """rotMNIST architecture, random weights, float32: with the original group-index table p4m is not invariant
    (~1e-3 relative here, 0.6 absolute on the trained checkpoint, see test_gevit_parity.py). (p4's original table
    equals the corrected one: test_gevit_layers.py.)"""
    x = torch.randn(1, 1, 28, 28)
    torch.manual_seed(0)
    model = build_gevit("rotmnist", "p4m", group_index="reference").eval()
    with torch.no_grad():
        logits = model(x)
        for t in (model.group.rot90_element(1), model.group.flip_element()):
            assert rel_err(model(model.group.act_on_image(x, t)), logits) > 1e-4


def test_gsa_nets_is_not_rot90_invariant_but_its_spatial_encoding_is_consistent() -> None:
    """GSA-Nets as published (its positional encoding and its group table (m + v - g)) is not rot90-invariant for p4:
    the "minor error". Its spatial encoding alone is consistent (a left action): with an invariant group table
    (group_index="corrected") the same network is exactly invariant, and its features follow the left action."""
    x = torch.randn(1, 1, 28, 28)
    torch.manual_seed(0)
    published = build_gevit("rotmnist", "p4", positional="gsa", group_index="reference").eval()
    with torch.no_grad():
        assert rel_err(published(torch.rot90(x, 1, (-2, -1))), published(x)) > 1e-4
    fixed = tiny("p4", positional="gsa", group_index="corrected")
    assert fixed.feature_side == "left"
    xs = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert max(_invariance_errors(fixed, xs)) < 1e-9
    g = fixed.group
    with torch.no_grad():
        for _, t in symmetries("p4"):
            for f, f_t in zip(fixed.forward_intermediates(xs), fixed.forward_intermediates(g.act_on_image(xs, t))):
                assert rel_err(f_t, g.act_on_group_signal(f, t, side="left")) < 1e-9


@pytest.mark.parametrize("group_name", ["p8", "p8m", "p16"])
def test_45_degree_rotations_are_measured(group_name: str) -> None:
    """Not a symmetry of the pixel grid: the invariance error is measured and printed; it is above rounding (the
    bilinear resampling is not exact) and far below that of the same network on the trivial group (z2), which
    knows nothing about rotations: a sign or direction error in the 45-degree element would lose that gap."""
    model = tiny(group_name, num_channels=8)
    group = model.group
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    x[..., 2:6, 2:6] = torch.randn(4, 4, dtype=torch.float64)  # content away from the corners
    t = group.index(group.n_rotations // 8)  # 45 degrees (bilinear resampling)
    with torch.no_grad():
        logits = model(x)
        err = rel_err(model(group.act_on_image(x, t)), logits)
        ref = rel_err(model(group.act_on_image(x, group.rot90_element(1))), logits)
        plain = tiny("z2", num_channels=8)
        base = rel_err(plain(group.act_on_image(x, t)), plain(x))
    print(f"\n{group_name}: 45-degree rotation relative logit change {err:.3g} (rot90: {ref:.1e}; z2: {base:.3g})")
    assert ref < 1e-9 and 1e-8 < err < base / 5, (err, base)


@pytest.mark.parametrize("group_name,attention", [("p4m", "local"), ("p8", "global"), ("mz2", "local")])
def test_model_fast_matches_plain(group_name: str, attention: str) -> None:
    model = tiny(group_name, attention)
    x = torch.randn(2, 1, model.config.image_size, model.config.image_size, dtype=torch.float64)
    results = []
    for impl in ("fast", "plain"):
        model.set_impl(impl)
        model.zero_grad()
        logits = model(x)
        (logits * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (l_fast, g_fast), (l_plain, g_plain) = results
    assert rel_err(l_fast, l_plain) < 1e-12
    scale = max(float(g.abs().max()) for g in g_plain)
    assert max(float((a - b).abs().max()) for a, b in zip(g_fast, g_plain)) < 1e-10 * scale


def test_training_mode_runs_and_dropout_is_active() -> None:
    model = tiny("p4", attention_dropout=0.3, value_dropout=0.1).float().train()
    x = torch.randn(2, 1, 8, 8)
    out_a, out_b = model(x), model(x)
    assert not torch.equal(out_a, out_b)
    out_a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_features_and_attention_maps_of_the_rotmnist_model() -> None:
    model = build_gevit("rotmnist", "p4", num_classes=2).eval()
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        assert [tuple(f.shape) for f in feats] == [(1, 20, 4, 24, 24), (1, 20, 4, 24, 24), (1, 20, 4, 12, 12),
                                                  (1, 20, 4, 8, 8), (1, 20, 4, 6, 6), (1, 20, 4, 4, 4), (1, 2, 4, 4, 4)]
        torch.testing.assert_close(model.pool(feats[-1]), model(x))
    lift = model.attention_maps(x, 0)
    assert lift.shape == (1, 9, 4, 28, 28, 5, 5)
    torch.testing.assert_close(lift.sum((-2, -1)), torch.ones(1, 9, 4, 28, 28))
    last = model.attention_maps(x, -1)
    assert last.shape == (1, 9, 4, 4, 6, 6, 4, 5, 5)
    assert len(model.attention_layers()) == 6
    with pytest.raises(IndexError, match="6 attention layers"):
        model.attention_maps(x, 6)


def test_bad_input_gives_clear_errors() -> None:
    model = build_gevit("rotmnist", "p4")
    with pytest.raises(ValueError, match=r"expects images \[B, 1, H, W\]"):
        model(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="must be square"):
        model(torch.randn(1, 1, 28, 24))
    with pytest.raises(ValueError, match=r"smaller than the network's crops.*at least 22x22"):
        model(torch.randn(1, 1, 12, 12))
    with pytest.raises(ValueError, match="unknown group 'p6'"):
        build_gevit("rotmnist", "p6")
    with pytest.raises(ValueError, match="unknown preset 'imagenet'"):
        build_gevit("imagenet", "p4")
    with pytest.raises(TypeError, match="unknown GE-ViT option"):
        build_gevit("rotmnist", "p4", num_chanels=8)
    with pytest.raises(ValueError, match="crop_per_layer has 2 values"):
        build_gevit("rotmnist", "p4", crop_per_layer=(1, 1))
    with pytest.raises(ValueError, match="built for 6x6 images"):
        tiny("p4", "global")(torch.randn(1, 1, 8, 8, dtype=torch.float64))
    # z2 and mz2 have no rotations: non-square images are fine
    assert tiny("mz2")(torch.randn(1, 1, 8, 12, dtype=torch.float64)).shape == (1, 3)


def test_incompatible_state_dict_names_missing_and_unexpected_keys() -> None:
    with pytest.raises(IncompatibleCheckpointError,
                       match=r"(?s)missing keys: \[.*lift\.query\.weight.*"
                             r"unexpected keys: \['transformer\.9\.bogus\.weight'\]"):
        from_original_state_dict({"transformer.9.bogus.weight": torch.zeros(1)}, "rotmnist", "p4")
