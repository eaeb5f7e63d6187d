"""The model registry (create_model / list_models / load_published) and the interface every model shares:
``model(x) == forward_head(forward_features(x))``, ``forward_intermediates``, ``get_classifier`` on the
``pre_logits`` embedding."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from gevit_lib.hub import IncompatibleCheckpointError
from gevit_lib.models import PUBLISHED, create_model, list_models, load_published, register_model
from gevit_lib.models.gevit import GEViT
from gevit_lib.models.vit import VisionTransformer

FAMILIES = ["gevit", "gsa_net", "hybrid_gevit", "patch_gevit", "vit"]
LOADABLE = ["gevit_p4msa_patch5_rotmnist", "gevit_p4sa_patch5_rotmnist", "vit_mnist", "vit_rotmnist",
            "vit_rotmnist_10pct"]
HYBRIDS = ["modern_eq_vit", "modern_eq_vit_finetuned"]

_TINY_GEVIT = dict(num_channels=8, num_heads=1, block_sizes=(1, 1), crop_per_layer=(1, 0))
# small members of every family and the input they take
SMALL: dict[str, tuple[dict, tuple[int, ...]]] = {
    "gevit": (dict(group="p4m", patch_size=3, num_classes=3, image_size=8, **_TINY_GEVIT), (3, 1, 8, 8)),
    "gsa_net": (dict(group="p4", patch_size=3, num_classes=3, image_size=8, **_TINY_GEVIT), (3, 1, 8, 8)),
    "vit": (dict(preset="mnist", num_layers=2), (3, 1, 28, 28)),
    "patch_gevit": (dict(preset="rotmnist", patch_size=2, image_size=8, embed_dim=4, num_classes=3,
                         gevit=dict(num_channels=8, num_heads=1, block_sizes=(1, 1), crop_per_layer=(1, 0))),
                    (3, 1, 8, 8)),
    "hybrid_gevit": (dict(preset="rotmnist", image_size=10, gcnn_channels=4, gcnn_layers=2, gcnn_kernel=3,
                          pooled_size=4, num_classes=3,
                          gevit=dict(num_channels=8, num_heads=1, block_sizes=(1, 1), crop_per_layer=(1, 0))),
                     (3, 1, 10, 10)),
}


def test_names() -> None:
    assert list_models(pretrained=True) == sorted(PUBLISHED) == sorted(LOADABLE + HYBRIDS)
    assert list_models(pretrained=False) == FAMILIES == sorted(SMALL)
    assert list_models() == sorted(FAMILIES + LOADABLE + HYBRIDS)


@pytest.mark.parametrize("name", list_models())
def test_every_name_builds_untrained(name: str) -> None:
    model = create_model(name)
    assert isinstance(model, nn.Module) and sum(p.numel() for p in model.parameters()) > 0


def test_published_names_build_their_architecture_with_overrides() -> None:
    p4m = create_model("gevit_p4msa_patch5_rotmnist")
    assert isinstance(p4m, GEViT)
    assert (p4m.group.name, p4m.config.patch_size, p4m.config.num_classes, p4m.config.group_index) == \
        ("p4m", 5, 2, "reference")
    assert create_model("gevit_p4msa_patch5_rotmnist", group_index="corrected").config.group_index == "corrected"
    vit = create_model("vit_rotmnist", num_classes=5)
    assert isinstance(vit, VisionTransformer) and vit.num_classes == 5
    hybrid = create_model("modern_eq_vit")
    assert sum(p.numel() for p in hybrid.parameters()) == 136_558  # the published hybrid's parameter count
    assert create_model("gevit", group="p8", patch_size=3).config.patch_size == 3
    assert create_model("gsa_net").config.positional == "gsa"


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'.*gevit_p4sa_patch5_rotmnist.*vit_rotmnist"):
        create_model("nope")
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        load_published("nope")


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_family_is_an_error(family: str) -> None:
    with pytest.raises(ValueError, match=f"{family!r} is a model family without published weights.*vit_rotmnist"):
        create_model(family, pretrained=True)


def test_register_model_refuses_a_taken_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda **kw: nn.Linear(1, 1), name="vit")


@pytest.mark.parametrize("family", FAMILIES)
def test_one_interface_for_every_family(family: str) -> None:
    """model(x) == forward_head(forward_features(x)) exactly; the intermediates end with the features; the
    classifier maps the pre-logits embedding to the same logits."""
    options, shape = SMALL[family]
    torch.manual_seed(0)
    model = create_model(family, **options).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        assert isinstance(features, torch.Tensor)
        assert torch.equal(model.forward_head(features), logits)
        assert logits.shape == (shape[0], model.num_classes)
        intermediates = model.forward_intermediates(x)
        assert isinstance(intermediates, list) and all(isinstance(t, torch.Tensor) for t in intermediates)
        last = intermediates[-1] if family == "vit" else intermediates[-2]  # GE-ViT's last is the classifier's
        assert torch.equal(last, features)
        embedding = model.forward_head(features, pre_logits=True)
        assert embedding.shape == (shape[0], model.num_features)
        torch.testing.assert_close(model.get_classifier()(embedding), logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_posthoc_wraps_every_family(family: str) -> None:
    from gevit_lib.posthoc import PostHoc

    options, shape = SMALL[family]
    torch.manual_seed(0)
    model = create_model(family, **options).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    wrapped = PostHoc(model, "mean", "C4")
    with torch.no_grad():
        torch.testing.assert_close(wrapped.base_logits(x), model(x), rtol=1e-10, atol=1e-10)
        assert wrapped(x).shape == (shape[0], model.num_classes)


def test_gevit_classifier_head_adds_no_state() -> None:
    model = create_model("gevit")
    keys = set(model.state_dict())
    head = model.get_classifier()
    assert set(model.state_dict()) == keys and head.classifier.weight is model.blocks[-1].weight


# ---- with the published checkpoints (skipped without the reference folder) ------------------------------------------
@pytest.mark.parametrize("name", LOADABLE)
def test_pretrained_matches_load_published(name: str, shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEVIT_CHECKPOINT_DIR", str(shared_dir / "reference" / "checkpoints"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        created = create_model(name, pretrained=True, download=False)
        published = load_published(name, download=False)
    untrained = create_model(name)
    assert published.published_name == name and not published.training
    assert type(created) is type(published) is type(untrained)
    ours, theirs = created.state_dict(), published.state_dict()
    assert list(ours) == list(theirs) == list(untrained.state_dict())
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not all(torch.equal(ours[k], v) for k, v in untrained.state_dict().items())


@pytest.mark.parametrize("name", HYBRIDS)
def test_published_hybrid_cannot_load(name: str, shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEVIT_CHECKPOINT_DIR", str(shared_dir / "reference" / "checkpoints"))
    with pytest.raises(IncompatibleCheckpointError, match="interpolating the stored filter"):
        create_model(name, pretrained=True, download=False)


@pytest.mark.parametrize("name", ["gevit_p4sa_patch5_rotmnist", "vit_mnist"])
def test_bad_batches_are_named(name: str) -> None:
    model = create_model(name).eval()
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros(0, 1, 28, 28))
    with pytest.raises(ValueError, match=r"float32 weights but got a torch.float64 input"):
        model(torch.zeros(1, 1, 28, 28, dtype=torch.float64))


@pytest.mark.parametrize("option, value, message", [
    ("attention_dropout", 1.5, "probability in \\[0, 1\\)"), ("value_dropout", -0.1, "probability"),
    ("patch_size", 5.0, "patch_size must be an integer"), ("num_heads", 0, "num_heads must be an integer >= 1"),
])
def test_gevit_options_are_checked(option: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("gevit", preset="rotmnist", group="p4", **{option: value})
