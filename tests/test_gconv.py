"""Exact G-CNN layers (gevit_lib.nn.gconv): layer-by-layer equivariance in float64, fast path == plain path."""

from __future__ import annotations

import pytest
import torch

from gevit_lib.equivariance import equivariance_errors, relative_error
from gevit_lib.groups import get_group
from gevit_lib.nn.gconv import GCNN, GroupConv, GroupPool, GroupSignalNorm, LiftingConv

GROUPS = ("p4", "p4m", "mz2")
TOL = 1e-12


pytestmark = pytest.mark.usefixtures("float64")  # every test here: float64, seed 0 (conftest)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("kernel, padding", [(3, 1), (4, 0), (5, 0)])
def test_lifting_conv_equivariant(group: str, kernel: int, padding: int) -> None:
    layer = LiftingConv(group, 2, 3, kernel, padding=padding)
    errors = equivariance_errors(layer, torch.randn(2, 2, 9, 9), group, side="left")
    assert len(errors) == len(get_group(group))
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("kernel, padding", [(3, 1), (4, 1), (5, 0)])
def test_group_conv_equivariant(group: str, kernel: int, padding: int) -> None:
    g = get_group(group)
    layer = GroupConv(g, 3, 2, kernel, padding=padding)
    errors = equivariance_errors(layer, torch.randn(2, 3, len(g), 9, 9), g, side="left", lifted_input=True)
    assert max(errors.values()) < TOL, errors


def test_equivariance_check_can_fail() -> None:
    """The group conv is equivariant for the left action only; checking the right action (or a plain conv with an
    untransformed filter) must show a large error, so the tests above are not vacuous."""
    g = get_group("p4")
    layer = GroupConv(g, 3, 2, 3, padding=1)
    x = torch.randn(2, 3, 4, 9, 9)
    wrong_side = equivariance_errors(layer, x, g, side="right", lifted_input=True)
    assert max(wrong_side.values()) > 1e-2

    plain = torch.nn.Conv2d(2, 3 * 4, 3, padding=1)
    as_lifting = lambda img: plain(img).view(img.shape[0], 3, 4, *img.shape[-2:])  # noqa: E731
    assert max(equivariance_errors(as_lifting, torch.randn(2, 2, 9, 9), g, side="left").values()) > 1e-2


@pytest.mark.parametrize("group", GROUPS)
def test_fast_equals_plain_with_gradients(group: str) -> None:
    """The filter-bank gather (fast) and transforming the input instead (plain) give the same outputs and grads."""
    g = get_group(group)
    for cls, shape in ((LiftingConv, (2, 2, 7, 7)), (GroupConv, (2, 2, len(g), 7, 7))):
        fast = cls(g, 2, 3, 3, padding=1, impl="fast")
        plain = cls(g, 2, 3, 3, padding=1, impl="plain")
        plain.load_state_dict(fast.state_dict())
        x = torch.randn(shape)
        out_f, out_p = fast(x), plain(x)
        assert relative_error(out_f, out_p) < TOL
        w = torch.randn_like(out_f)
        (out_f * w).sum().backward()
        (out_p * w).sum().backward()
        assert relative_error(fast.weight.grad, plain.weight.grad) < TOL
        assert relative_error(fast.bias.grad, plain.bias.grad) < TOL


def test_filter_bank_is_a_permutation_of_the_filter() -> None:
    g = get_group("p4m")
    layer = GroupConv(g, 2, 3, 3)
    bank = layer.filter_bank().view(3, len(g), 2, len(g), 3, 3)
    assert torch.equal(bank[:, 0], layer.weight)  # identity element: the stored filter
    for h in range(len(g)):
        assert torch.equal(bank[:, h].flatten(1).sort(-1).values, layer.weight.flatten(1).sort(-1).values)
        assert torch.equal(bank[:, h], g.act_on_group_signal(layer.weight, h, side="left", group_dim=2))


@pytest.mark.parametrize("group", ("p4", "p4m"))
def test_gcnn_stack_equivariant_layer_by_layer(group: str) -> None:
    g = get_group(group)
    net = GCNN(g, 2, 4, num_layers=3, kernel_size=3, padding=0, norm=True, norm_affine=True)
    for m in net.modules():  # random affine norm parameters and biases, so they are exercised too
        if isinstance(m, (GroupSignalNorm, LiftingConv, GroupConv)) and m.bias is not None:
            torch.nn.init.normal_(m.bias)
    x = torch.randn(2, 2, 12, 12)
    signal = x
    for i, layer in enumerate(net.layers):
        errors = equivariance_errors(layer, signal, g, side="left", lifted_input=i > 0)
        assert max(errors.values()) < TOL, (i, layer, errors)
        signal = layer(signal)
    # invariant pooling over the group axis turns the signal into an image that transforms as an image
    pooled = lambda img: GroupPool("max")(net(img))  # noqa: E731
    for h in g.exact_elements:
        assert relative_error(pooled(g.act_on_image(x, h)), g.act_on_image(pooled(x), h)) < TOL


def test_rejects_non_exact_groups_and_bad_inputs() -> None:
    with pytest.raises(ValueError, match="exact pixel permutations"):
        LiftingConv("p8", 1, 2)
    layer = GroupConv("p4", 3, 2, 3)
    with pytest.raises(ValueError, match=r"group signals \[B, 3, 4, H, W\]"):
        layer(torch.randn(1, 3, 8, 7, 7))
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        layer(torch.randn(1, 3, 4, 2, 2))
    with pytest.raises(ValueError, match="square"):
        LiftingConv("p4", 1, 2)(torch.randn(1, 1, 8, 9))
    with pytest.raises(ValueError, match="impl"):
        LiftingConv("p4", 1, 2, impl="magic")
    with pytest.raises(ValueError, match="mode"):
        GroupPool("sum")
