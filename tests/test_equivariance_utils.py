"""The measuring helpers: exact invariance is detected as ~0, a non-invariant map is not; and the checks the figure
notebooks show (encoding invariance, the p4m table, lifting-attention equivariance, steerability, the rotation
sweep) on tiny untrained models."""

from __future__ import annotations

import pytest
import torch

from gevit_lib.equivariance import (EXACT_TRANSFORMS, exact_invariance, invariance_errors, lifting_attention_error,
                                    relative_error, rotate_lifting_attention, rotation_sweep)
from gevit_lib.groups import get_group
from gevit_lib.models.gevit import GEViT, build_gevit
from gevit_lib.models.vit import build_vit


def test_invariance_errors_detect_invariant_and_non_invariant_maps() -> None:
    x = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    g = get_group("p4m")
    invariant = invariance_errors(lambda t: t.sum((-2, -1)), x, g)
    assert set(invariant) == set(range(8)) and max(invariant.values()) < 1e-12
    weights = torch.randn(9, 9, dtype=torch.float64)
    not_invariant = invariance_errors(lambda t: (t * weights).sum((-2, -1)), x, g)
    assert not_invariant[0] == 0 and min(v for k, v in not_invariant.items() if k) > 1e-3


def test_rotation_sweep_is_exact_at_quarter_turns_only() -> None:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 21), torch.linspace(-1, 1, 21), indexing="ij")
    img = torch.exp(-((xx - 0.3) ** 2 + (yy + 0.1) ** 2) / 0.1)[None, None].double()
    errs = rotation_sweep(lambda t: t.flatten(1).norm(dim=1), img, [0, 45, 90, 180, 270])
    assert errs[[0, 2, 3, 4]].abs().max() < 1e-12 and errs[1] > 0
    assert relative_error(torch.ones(2), torch.zeros(2)) == 1.0


# ---- the checks of the figure notebooks on tiny float64 GE-ViTs ------------------------------------------------
def tiny(group: str, group_index: str = "corrected", positional: str = "gevit", **kw) -> GEViT:
    """lift -> one group layer -> classifier on 28 x 28 images, the library's random initialisation, float64."""
    opts = dict(num_channels=8, num_heads=2, block_sizes=(1,), crop_per_layer=(0,), num_classes=2,
                attention_dropout=0.0, value_dropout=0.0)
    opts.update(kw)
    torch.manual_seed(0)
    model = build_gevit("rotmnist", group, patch_size=5, group_index=group_index, positional=positional, **opts)
    return model.double().eval()


def digits(n: int = 2) -> torch.Tensor:
    """Raw [0, 1] images with a bar and a blob off-centre: not symmetric under any rotation or mirror."""
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:20, 9:13] = 1.0
    x[:, :, 6:10, 9:22] = 0.8
    return (x * (0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g))).double()


def test_exact_transforms_are_pixel_permutations() -> None:
    x = digits(1)
    assert torch.equal(EXACT_TRANSFORMS["rot90"](x), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(EXACT_TRANSFORMS["rot270"](EXACT_TRANSFORMS["rot90"](x)), x)
    assert torch.equal(EXACT_TRANSFORMS["flip"](x), x.flip(-1))
    errors = exact_invariance(lambda t: t.sum((-2, -1)), x, ("rot90", "rot180", "rot270", "flip"))
    assert max(errors.values()) < 1e-12
    assert exact_invariance(lambda t: t[..., :14, :].sum((-2, -1)), x)["rot180"] > 0.1


def test_encoding_invariance_separates_gsa_from_gevit() -> None:
    """Notebook 2: the published GSA-Nets pairing of spatial encoding and group table is not invariant, GE-ViT's and
    GSA's grid with a consistent table are (same random weights, float64, exact quarter turns)."""
    x = (digits(1) - 0.1307) / 0.3081
    errors = {}
    for name, (positional, table) in {"GSA-Nets": ("gsa", "reference"), "GE-ViT": ("gevit", "reference"),
                                      "GSA + consistent table": ("gsa", "corrected")}.items():
        errors[name] = max(exact_invariance(tiny("p4", table, positional), x).values())
    assert errors["GE-ViT"] < 1e-9 and errors["GSA + consistent table"] < 1e-9
    assert errors["GSA-Nets"] > 1e-6


def test_p4m_reference_table_breaks_invariance_and_the_corrected_one_restores_it() -> None:
    """Notebook 4: the published p4m table is not equivariant in the group layers; the corrected one is exact."""
    x = (digits(1) - 0.1307) / 0.3081
    names = ("rot90", "rot180", "rot270", "flip")
    assert max(exact_invariance(tiny("p4m", "corrected"), x, names).values()) < 1e-9
    assert exact_invariance(tiny("p4m", "reference"), x, names)["rot90"] > 1e-6


def test_attention_layers_return_their_attention() -> None:
    model = tiny("p4m")
    x = digits(2)
    out, maps = model.lift(x, return_attention=True)
    assert torch.equal(out, model.lift(x)) and maps.shape == (2, 2, 8, 28, 28, 5, 5)
    assert torch.equal(maps, model.lift.attention_probabilities(x))
    inside = maps[:, :, :, 2:-2, 2:-2]  # pixels whose whole 5 x 5 neighbourhood is inside the image
    torch.testing.assert_close(inside.sum((-2, -1)), torch.ones_like(inside[..., 0, 0]))
    torch.testing.assert_close(maps, model.attention_maps(x, layer=0))
    group_layer = model.attention_layers()[1]
    h = model.lifted(x)
    out, maps = group_layer(h, return_attention=True)
    assert torch.equal(out, group_layer(h)) and maps.shape == (2, 2, 8, 8, 28, 28, 8, 5, 5)


@pytest.mark.parametrize("positional", ["gevit", "gsa"])
def test_lifting_attention_is_exactly_equivariant(positional: str) -> None:
    """Notebook 3's check: the attention of rot90(x) is the attention of x with the group axis permuted by the
    model's regular action and the pixel and neighbourhood axes turned; the other action does not fit (p4m is not
    abelian), so the check can fail."""
    model = tiny("p4m", positional=positional)
    x = (digits(1) - 0.1307) / 0.3081
    for k in (1, 2, 3):
        assert lifting_attention_error(model.lift, x, k) < 1e-8
    _, maps = model.lift(x, return_attention=True)
    _, turned = model.lift(torch.rot90(x, 1, dims=(-2, -1)), return_attention=True)
    wrong = "left" if model.feature_side == "right" else "right"
    assert (turned - rotate_lifting_attention(maps, model.group, 1, wrong)).abs().max() > 1e-3


def test_untrained_p8_is_exact_at_quarter_turns_only() -> None:
    """Notebook 5's Fig. 8: a p8 model's encoding can rotate by 45 degrees, the pixel grid cannot."""
    model = tiny("p8", num_channels=8, block_sizes=(1,), crop_per_layer=(0,))
    errs = rotation_sweep(model, digits(1), [k * 45.0 for k in range(8)])
    assert errs[0::2].max() < 1e-9 and errs[1::2].min() > 1e-6


def test_rotation_sweep_of_p4_and_vit() -> None:
    """Notebook 5's sweep: GE-ViT p4 exact at the quarter turns, interpolated angles not; a ViT exact nowhere."""
    x = (digits(2) - 0.1307) / 0.3081
    errs = rotation_sweep(tiny("p4"), x, (0.0, 45.0, 90.0, 180.0))
    assert errs[0] == 0 and errs[2] < 1e-9 and errs[3] < 1e-9 and errs[1] > 1e-6
    torch.manual_seed(0)
    vit = build_vit("mnist", embed_dim=8, hidden_dim=16, num_heads=2, num_layers=1, dropout=0.0).double().eval()
    assert rotation_sweep(vit, x, (90.0,))[0] > 1e-6
