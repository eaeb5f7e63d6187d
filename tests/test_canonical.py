"""Learned canonicalization (gevit_lib.canonical): equivariant scores, exact C4 / D4 invariance in float64 on our
ViT, a timm model and torchvision's ResNet-18, the straight-through training path, the canonicalization prior,
C8 / C16 (exact for quarter turns only; the other angles measured and printed), and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gevit_lib.canonical import CanonicalizationNet, Canonicalized
from gevit_lib.groups import get_group
from gevit_lib.posthoc import TransformStack
from gevit_lib.train import TrainConfig, fit
from tests.test_posthoc import tiny_vit


def strokes(n: int, size: int = 28, channels: int = 1, seed: int = 0) -> Tensor:
    """Smooth, non-symmetric float64 images: Gaussian blobs at random points inside the inscribed circle (so that
    rotating by any angle keeps the content)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(*(torch.arange(size, dtype=torch.float64) - (size - 1) / 2,) * 2, indexing="ij")
    r = torch.rand(n, channels, 5, generator=g, dtype=torch.float64) * size / 3.5
    a = torch.rand(n, channels, 5, generator=g, dtype=torch.float64) * 6.2832
    cy, cx = (r * a.sin())[..., None, None], (r * a.cos())[..., None, None]
    return torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0).sum(2)


def _backbone(name: str) -> tuple[nn.Module, int, int]:
    """(float64 model in eval mode, channels, image size)."""
    import timm
    import torchvision

    torch.manual_seed(0)
    if name == "vit":
        return tiny_vit(), 1, 28
    if name == "timm":
        return timm.create_model("test_resnet", pretrained=False, num_classes=3).double().eval(), 3, 16
    return torchvision.models.resnet18(num_classes=3).double().eval(), 3, 16


def _actions(name: str) -> list[int]:
    return [h for h in get_group(name).exact_elements if h]


@pytest.mark.parametrize("group", ["C4", "D4", "C2", "D2"])
def test_scores_permute_by_the_cayley_table(group: str) -> None:
    torch.manual_seed(0)
    g = get_group(group)
    net = CanonicalizationNet(group, 3).double()
    x = torch.randn(4, 3, 40, 40, dtype=torch.float64)  # larger than input_size: the pooled path
    with torch.no_grad():
        s = net(x)
        for h in _actions(group):
            # scores(T_h x)[k] = scores(x)[h^-1 k] (left regular), so the argmax moves from k to h k
            torch.testing.assert_close(net(g.act_on_image(x, h)), s[:, g.left_regular(h)], rtol=0, atol=1e-12)
            assert not torch.allclose(net(g.act_on_image(x, h)), s)  # not invariant: the check can fail


@pytest.mark.parametrize("backbone", ["vit", "timm", "torchvision_resnet18"])
@pytest.mark.parametrize("group", ["C4", "D4"])
def test_exact_invariance_float64(group: str, backbone: str) -> None:
    model, channels, size = _backbone(backbone)
    g = get_group(group)
    wrapper = Canonicalized(model, group).eval()
    x = torch.randn(2, channels, size, size, dtype=torch.float64)
    with torch.no_grad():
        logits, base, (canon, best) = wrapper(x), wrapper.base_logits(x), wrapper.canonicalize(x)
        for h in _actions(group):
            moved = g.act_on_image(x, h)
            canon_h, best_h = wrapper.canonicalize(moved)
            assert torch.equal(best_h, g.cayley[h, best])  # the pose moves from k to h k
            assert torch.equal(canon_h, canon)  # every transformed input lands on the same canonical image
            assert torch.equal(wrapper(moved), logits)
            assert (wrapper.base_logits(moved) - base).abs().max() > 1e-6  # the backbone alone is not invariant


def test_constant_and_symmetric_inputs() -> None:
    """Ties from a symmetry of the input are harmless: every tied pose gives the same canonical image."""
    wrapper = Canonicalized(tiny_vit(), "D4").eval()
    x = strokes(2)
    sym = x + torch.rot90(x, 2, (-2, -1))  # 180-degree symmetric
    with torch.no_grad():
        for img in (torch.full((1, 1, 28, 28), 0.3, dtype=torch.float64), sym):
            ref = wrapper(img)
            for h in _actions("D4"):
                assert torch.equal(wrapper(get_group("D4").act_on_image(img, h)), ref)


def test_training_path_is_the_argmax_copy_and_trains_the_net() -> None:
    wrapper = Canonicalized(tiny_vit(), "D4")
    x = strokes(4)
    with torch.no_grad():
        canon_eval, best_eval = wrapper.eval().canonicalize(x)
    wrapper.train()
    canon, best = wrapper.canonicalize(x)
    assert canon.requires_grad and torch.equal(best, best_eval)
    assert torch.equal(canon, canon_eval)  # straight-through: exactly the argmax copy forward
    F.cross_entropy(wrapper.base_logits(canon), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapper.net.parameters())
    assert all(p.grad is None for p in wrapper.backbone.parameters())  # finetune="none": frozen


def test_fit_trains_only_the_net_with_the_prior_loss() -> None:
    torch.manual_seed(0)
    wrapper = Canonicalized(tiny_vit(torch.float32), "C4", prior_weight=0.5)
    data = (strokes(16).float(), torch.arange(16) % 5)
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    fit(wrapper, data, None, TrainConfig(epochs=1, batch_size=8, lr=1e-2), loss_fn=wrapper.loss, progress=False)
    changed = {k for k, v in wrapper.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("net.") for k in changed)


def test_prior_is_neutral_at_zero_and_pulls_toward_the_identity() -> None:
    torch.manual_seed(0)
    x, y = strokes(1, seed=2) + 0.3 * strokes(16), torch.arange(16) % 5  # one upright pattern, varied
    off, on = Canonicalized(tiny_vit(), "C4").train(), Canonicalized(tiny_vit(), "C4", prior_weight=2.0).train()
    on.net.load_state_dict(off.net.state_dict())
    logits_off, logits_on = off(x), on(x)
    assert torch.equal(off.loss(logits_off, y), F.cross_entropy(logits_off, y))
    torch.testing.assert_close(on.loss(logits_on, y), F.cross_entropy(logits_on, y) + 2.0 * on.prior_loss())
    assert on.prior_loss() > 0

    def identity_probability() -> float:
        with torch.no_grad():
            return torch.softmax(on.net(x), 1)[:, 0].mean().item()

    start = identity_probability()
    opt = torch.optim.Adam(on.trainable_parameters(), lr=3e-2)
    for _ in range(15):  # upright training images, the backbone frozen
        opt.zero_grad()
        on.loss(on(x), y).backward()
        opt.step()
    assert identity_probability() > start + 0.3, (start, identity_probability())


def test_finetune_modes() -> None:
    wrapper = Canonicalized(tiny_vit(torch.float32), "D4")
    net, head = {id(p) for p in wrapper.net.parameters()}, {id(p) for p in wrapper.head.parameters()}
    assert {id(p) for p in wrapper.trainable_parameters()} == net
    assert {id(p) for p in wrapper.set_finetune("head").trainable_parameters()} == net | head
    assert {id(p) for p in wrapper.set_finetune("model").trainable_parameters()} == {id(p) for p in
                                                                                     wrapper.parameters()}
    with pytest.raises(ValueError, match="finetune mode"):
        wrapper.set_finetune("all")


@pytest.mark.parametrize("group", ["C8", "C16"])
def test_c8_c16_exact_for_quarter_turns_measured_otherwise(group: str) -> None:
    g = get_group(group)
    wrapper = Canonicalized(tiny_vit(), group).eval()
    assert not wrapper.exact and "exact=False" in repr(wrapper)
    x = strokes(200, seed=1)
    with torch.no_grad():
        logits, best = wrapper(x[:4]), wrapper.canonicalize(x)[1]
        for k in (1, 2, 3):
            moved = torch.rot90(x, k, (-2, -1))
            assert torch.equal(wrapper.canonicalize(moved)[1], g.cayley[g.rot90_element(k), best])
            assert torch.equal(wrapper(moved[:4]), logits)
        # one step of 360 / n degrees CCW (nearest, as the wrapper's copies): how often does the pose follow?
        step = TransformStack(group)
        moved = step(x)[:, 1]
        disagree = (wrapper.canonicalize(moved)[1] != g.cayley[step.elements[1], best]).double().mean().item()
    print(f"\n{group}, untrained canonicalization net, 200 smooth synthetic images rotated by {360 / g.n_rotations:g} "
          f"degrees (nearest): the canonical pose does not follow for {disagree:.1%} (a random pose: "
          f"{1 - 1 / len(g):.1%})")
    assert 0.0 <= disagree <= 1.0


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown group"):
        Canonicalized(tiny_vit(), "Q7")
    for name in ("D8", "C6", "C3"):
        with pytest.raises(ValueError, match="C_4m"):
            Canonicalized(tiny_vit(), name)
    wrapper = Canonicalized(tiny_vit(), "C4")
    with pytest.raises(RuntimeError, match="forward pass"):
        wrapper.prior_loss()
    with pytest.raises(ValueError, match=r"expects images \[B, 1, H, W\].*in_channels"):
        wrapper(torch.randn(2, 3, 28, 28, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-empty batch"):
        wrapper(torch.randn(0, 1, 28, 28, dtype=torch.float64))
    with pytest.raises(ValueError, match="model's dtype torch.float64, got shape .* dtype torch.float32"):
        wrapper(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        wrapper(torch.randn(1, 28, 28, dtype=torch.float64))
    with pytest.raises(TypeError, match="SplitBackbone"):
        Canonicalized(nn.Linear(4, 2), "C4", in_channels=1)
    with pytest.raises(ValueError, match="prior_weight"):
        Canonicalized(tiny_vit(), "C4", prior_weight=-1.0)
