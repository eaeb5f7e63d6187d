"""Patch-embedding and hybrid G-CNN -> GE-ViT models (gevit_lib.models.hybrid) and the modern-ViT experiment.

Invariance is asserted exactly (float64, eval mode, random weights) for rot90 k = 1..3 and, for p4m, flips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gevit_lib.equivariance import invariance_errors, relative_error
from gevit_lib.groups import get_group
from gevit_lib.hub import IncompatibleCheckpointError
from gevit_lib.models.gevit import convert_original_state_dict
from gevit_lib.models.hybrid import (
    InvariantPatchEmbedding,
    build_hybrid,
    build_patch_gevit,
    check_exact_pooling,
    from_original_state_dict,
    grid_layout,
)

TOL = 1e-9
TINY_GEVIT = {"num_channels": 8, "num_heads": 1}
# two GE-ViT layers on a 4x4 patch grid: crop 1 (4 -> 2), max-pool (2 -> 1), one more layer
TWO_LAYERS = {**TINY_GEVIT, "block_sizes": (1, 1), "crop_per_layer": (1, 0)}


def _exact_symmetries(group: str) -> dict[int, str]:
    g = get_group(group)
    names = {g.rot90_element(k): f"rot90 k={k}" for k in (1, 2, 3)}
    if g.mirror:
        names[g.flip_element()] = "flip W"
        names[g.mul(g.flip_element(), g.rot90_element(2))] = "flip H"
    return names


def _assert_invariant(model: torch.nn.Module, x: torch.Tensor, group: str) -> None:
    """Relative logit change under torch.rot90 / torch.flip of the input."""
    model.eval()
    with torch.no_grad():
        ref = model(x)
        checks = {f"rot90 k={k}": torch.rot90(x, k, dims=(-2, -1)) for k in (1, 2, 3)}
        if get_group(group).mirror:
            checks.update({"flip W": torch.flip(x, (-1,)), "flip H": torch.flip(x, (-2,))})
        errors = {name: relative_error(model(xt), ref) for name, xt in checks.items()}
    assert max(errors.values()) <= TOL, errors


# ---- invariant patch embeddings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("group", ("p4", "p4m"))
@pytest.mark.parametrize("method, hidden", [("mean", None), ("mean", 6), ("gcnn", None)])
def test_patch_embedding_is_an_image_of_invariants(float64, group: str, method: str, hidden: int | None) -> None:
    """embed(T_g x) == T_g embed(x): every patch embedding is invariant and the patch grid rotates as an image."""
    emb = InvariantPatchEmbedding(2, 3, 5, group, method=method, hidden_dim=hidden, gcnn_channels=3).eval()
    g = get_group(group)
    x = torch.randn(2, 2, 12, 12)
    out = emb(x)
    assert out.shape == (2, 5, 4, 4)
    for h in g.exact_elements:
        assert relative_error(emb(g.act_on_image(x, h)), g.act_on_image(out, h)) < 1e-12


@pytest.mark.parametrize("group", ("p4", "p4m"))
def test_linear_patch_embedding_fast_equals_plain(float64, group: str) -> None:
    """Mean over transformed copies of a Linear layer == one conv with the group-averaged filter (values, grads)."""
    fast = InvariantPatchEmbedding(3, 4, 6, group, impl="fast")
    plain = InvariantPatchEmbedding(3, 4, 6, group, impl="plain")
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 16, 16)
    a, b = fast(x), plain(x)
    assert relative_error(a, b) < 1e-12
    a.square().sum().backward()
    b.square().sum().backward()
    assert relative_error(fast.phi.weight.grad, plain.phi.weight.grad) < 1e-12


@pytest.mark.parametrize("group", ("p4", "p4m"))
@pytest.mark.parametrize("method", ("mean", "gcnn"))
def test_patch_gevit_invariant(float64, group: str, method: str) -> None:
    model = build_patch_gevit("rotmnist", group, patch_size=2, embed_method=method, image_size=8, embed_dim=4,
                              gcnn_channels=3, gevit=TWO_LAYERS)
    assert model.gevit.config.group_index == "corrected"
    _assert_invariant(model, torch.randn(2, 1, 8, 8), group)


def test_patch_gevit_p4_with_d4_patches_is_not_flip_invariant(float64) -> None:
    """The post's combination (D4 patch transforms, p4 GE-ViT) is rot90-invariant only: the check notices flips."""
    model = build_patch_gevit("rotmnist", "p4", patch_size=2, patch_group="p4m", image_size=8, embed_dim=4,
                              gevit=TWO_LAYERS).eval()
    x = torch.randn(2, 1, 8, 8)
    _assert_invariant(model, x, "p4")
    errors = invariance_errors(model, x, get_group("p4m"))
    assert errors[get_group("p4m").flip_element()] > 1e-4


# ---- hybrid --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", ("p4", "p4m"))
def test_hybrid_invariant(float64, group: str) -> None:
    model = build_hybrid("rotmnist", group, image_size=10, gcnn_channels=4, gcnn_layers=2, gcnn_kernel=3,
                         pooled_size=4, gevit=TWO_LAYERS)
    _assert_invariant(model, torch.randn(2, 1, 10, 10), group)


def test_post_hybrid_architecture() -> None:
    """The post's hybrid (D4 G-CNN, p4 GE-ViT) has the published checkpoint's 136,558 parameters."""
    model = build_hybrid("pcam", "p4", gcnn_group="p4m")
    assert sum(p.numel() for p in model.gcnn.parameters()) == 90_200
    assert sum(p.numel() for p in model.parameters()) == 136_558
    plan = model.gevit.config.layer_plan()
    assert [k for k, *_ in plan].count("pool") == 2  # max-pool after every block: 6 -> 4 -> 2 -> 1
    assert model.gevit.config.output_size(6) == 1


def test_published_hybrid_refused_with_reason(shared_dir: Path) -> None:
    """The GE-ViT half of the published hybrid maps onto this model; its resampling G-CNN does not (clear error)."""
    state = torch.load(shared_dir / "reference/checkpoints/modern_eq_vit.pt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = build_hybrid("pcam", "p4", gcnn_group="p4m")
    weights, _ = convert_original_state_dict({k.removeprefix("group_transformer."): v for k, v in state.items()
                                              if k.startswith("group_transformer.")})
    model.gevit.load_state_dict(weights, strict=True)
    with pytest.raises(IncompatibleCheckpointError, match="interpolating the stored filter"):
        from_original_state_dict(state)
    with pytest.raises(IncompatibleCheckpointError, match="not an original hybrid"):
        from_original_state_dict(weights)


# ---- layouts and errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", range(1, 17))
def test_grid_layout_pools_only_even_maps(grid: int) -> None:
    from gevit_lib.models.gevit import GEViTConfig

    for pool_last in (False, True):
        layout = grid_layout(grid, pool_last=pool_last)
        check_exact_pooling(GEViTConfig(**layout), grid)


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="must divide the image size"):
        build_patch_gevit("rotmnist", "p4", patch_size=5)
    with pytest.raises(ValueError, match="max-pool a 5x5 map"):
        build_patch_gevit("rotmnist", "p4", patch_size=4,
                          gevit={"block_sizes": (2, 3), "crop_per_layer": (1, 0, 0, 0, 0)})
    with pytest.raises(ValueError, match="must contain the exact elements"):
        build_patch_gevit("rotmnist", "p4m", patch_size=4, patch_group="p4")
    with pytest.raises(ValueError, match="exact pixel permutations"):
        build_hybrid("rotmnist", "p8")
    with pytest.raises(ValueError, match="embed method"):
        build_patch_gevit("rotmnist", "p4", embed_method="max")
    with pytest.raises(TypeError, match="unknown PatchGEViT option"):
        build_patch_gevit("rotmnist", "p4", channels=3)
    model = build_patch_gevit("rotmnist", "p4", patch_size=7, embed_dim=4, gevit=TINY_GEVIT)
    with pytest.raises(ValueError, match="built for 28x28"):
        model(torch.randn(1, 1, 21, 21))


# ---- the experiment (smoke profile, generated data) -------------------------------------------------------------
def test_measure_speed_budget_and_copy() -> None:
    from gevit_lib.experiments.modern_vit import measure_speed

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    before = [p.clone() for p in model.parameters()]
    speed = measure_speed(model, (1, 4, 4), 3, "cpu", batch_size=4, steps=2)
    assert speed["infer_img_s"] > 0 and speed["train_img_s"] > 0 and speed["peak_mem_mib"] >= 0
    assert speed["timed_batches"] == [2, 2]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # measured on a copy
    slow = measure_speed(model, (1, 4, 4), 3, "cpu", batch_size=4, steps=2, budget_s=1e-9)
    assert slow["train_img_s"] is None and "training not timed" in slow["note"]


def test_model_zoo_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gevit_lib.data import make_synthetic_mnist
    from gevit_lib.experiments.modern_vit import model_zoo

    monkeypatch.setenv("GEVIT_CACHE_DIR", str(tmp_path / "cache"))
    make_synthetic_mnist(tmp_path / "data", n_train=300, n_test=50)
    out = tmp_path / "out"
    result = model_zoo("smoke", "cpu", tmp_path / "data", out, 0, dataset="rotmnist", progress=False)
    for name in ("model_zoo.csv", "model_zoo.md", "model_zoo.json", "ablation.png", "ablation.json", "meta.json"):
        assert (out / name).is_file(), name
    families = {r["family"] for r in result.rows}
    assert families == {"vit", "posthoc", "gevit", "patch", "hybrid"}
    for row in result.rows:
        assert row["params"] > 0 and row["infer_img_s_cpu"] > 0, row
        if row["family"] != "gevit":
            assert 0 <= row["test_acc"] <= 100 and 0 <= row["val_acc"] <= 100, row
    gevit = result.row("gevit_p4_P5")
    assert gevit["n_train"] == 4 and "trained on 4 images only" in gevit["note"]
    sidecar = json.loads((out / "ablation.json").read_text())
    assert sidecar["profile"] == "smoke" and sidecar["seed"] == 0 and "data_source" in sidecar
    assert len(sidecar["data_points"]) == 2  # patch sizes 7 and 14
    assert "Patch GE-ViT p4, patch 7" in result.markdown() == (out / "model_zoo.md").read_text()


def test_published_gevit_row_accuracy(shared_dir: Path) -> None:
    """The GE-ViT p4, P=5 row reports the published checkpoint's accuracy, computed here on the run's images."""
    from gevit_lib.models import load_published
    from gevit_lib.experiments.modern_vit import _published_accuracy, modern_vit_profile

    prof = modern_vit_profile("rotmnist", "quick", {"gevit_n_eval": 6, "eval_batch_size": 3})
    assert ("p4", 5, "gevit_p4sa_patch5_rotmnist") in prof.gevit_published
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    model = load_published("gevit_p4sa_patch5_rotmnist")
    with torch.no_grad():
        expected = 100.0 * (model(x[:6]).argmax(-1) == y[:6]).double().mean().item()
    out = _published_accuracy("gevit_p4sa_patch5_rotmnist", {"validation": (x, y), "test": (x, y)}, prof, "cpu")
    assert out is not None
    assert out["row"]["val_acc"] == pytest.approx(expected) and out["row"]["test_acc"] == pytest.approx(expected)
    assert out["row"]["checkpoint"] == "gevit_p4sa_patch5_rotmnist" and "6 / 6" in out["note"]


def test_published_gevit_row_falls_back_when_missing(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from gevit_lib import models
    from gevit_lib.experiments.modern_vit import _published_accuracy, modern_vit_profile
    from gevit_lib.files import MissingFileError

    def missing(name: str, download: bool = True, **options):
        raise MissingFileError(f"{name}.pt not found")

    monkeypatch.setattr(models, "load_published", missing)
    prof = modern_vit_profile("rotmnist", "quick")
    x, y = torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    assert _published_accuracy("gevit_p4sa_patch5_rotmnist", {"validation": (x, y), "test": (x, y)}, prof,
                               "cpu") is None
    assert "not available" in capsys.readouterr().out


def test_published_gevit_row_refuses_a_corrupt_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from gevit_lib import models
    from gevit_lib.experiments.modern_vit import _published_accuracy, modern_vit_profile
    from gevit_lib.files import ChecksumError

    def corrupt(name: str, download: bool = True, **options):
        raise ChecksumError(f"{name}.pt: sha256 mismatch")

    monkeypatch.setattr(models, "load_published", corrupt)
    x, y = torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ChecksumError, match="sha256"):
        _published_accuracy("gevit_p4sa_patch5_rotmnist", {"validation": (x, y), "test": (x, y)},
                            modern_vit_profile("rotmnist", "quick"), "cpu")


def test_select_models_and_comparison() -> None:
    from gevit_lib.experiments.modern_vit import ZooResult, model_specs, modern_vit_profile, select_models

    specs = model_specs("rotmnist", modern_vit_profile("rotmnist", "quick"))
    assert [s.key for s in select_models(specs, ["posthoc_mean_C4", "hybrid_p4"])] == [
        "vit", "posthoc_mean_C4", "hybrid_p4"]  # table order; the post-hoc row brings its ViT
    with pytest.raises(ValueError, match="unknown model key"):
        select_models(specs, ["patch_p4_p5_mean"])
    rows = [
        {"key": "gevit_p4_P5", "name": "GE-ViT p4, P=5", "family": "gevit", "val_acc": 80.0, "test_acc": 81.0,
         "train_img_s_cpu": 2.0, "infer_img_s_cpu": 10.0, "note": "published"},
        {"key": "a", "name": "A", "family": "patch", "val_acc": 70.0, "test_acc": 90.0, "train_img_s_cpu": 100.0,
         "infer_img_s_cpu": 300.0},
        {"key": "b", "name": "B", "family": "patch", "val_acc": 75.0, "test_acc": 60.0, "train_img_s_cpu": 50.0,
         "infer_img_s_cpu": 100.0},
    ]
    result = ZooResult("rotmnist", "quick", rows, {})
    cmp = result.comparison()
    assert cmp is not None
    assert cmp["model"] == "b"  # selected on validation, not test
    assert cmp["train_speedup"] == pytest.approx(25.0) and cmp["infer_speedup"] == pytest.approx(10.0)
    assert cmp["reference_test_acc"] == 81.0 and result.comparison("missing") is None


def test_posthoc_copies_shared_between_cyclic_groups() -> None:
    """C4 / C8 copies are every 4th / 2nd C16 copy (same images), so the experiment computes C16 embeddings once."""
    from gevit_lib.experiments.modern_vit import _posthoc_accuracy, posthoc_mean
    from gevit_lib.models.vit import build_vit

    torch.manual_seed(0)
    vit = build_vit("mnist", embed_dim=16, hidden_dim=16, num_heads=2, num_layers=1).eval()
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6) % 3
    big = posthoc_mean(vit, "C16").transformed_embeddings(x)
    for group, step in (("C4", 4), ("C8", 2)):
        assert torch.equal(posthoc_mean(vit, group).transformed_embeddings(x), big[:, ::step])
        cache: dict = {}
        shared = _posthoc_accuracy(vit, group, ("C4", "C8", "C16"), (x, y), 4, "cpu", cache, "test")
        assert list(cache) == [("C16", "test")]
        direct = posthoc_mean(vit, group).eval()(x).argmax(-1)
        assert shared == pytest.approx(100.0 * (direct == y).double().mean().item())


def test_patch_size_ablation_pcam_smoke(tmp_path: Path) -> None:
    """PCam path (lazy h5 data, random D4 augmentation): the ablation writes its table and plot."""
    from gevit_lib.data import write_fake_pcam
    from gevit_lib.experiments.modern_vit import patch_size_ablation

    write_fake_pcam(tmp_path / "data", n_per_split=8)
    result = patch_size_ablation("smoke", "cpu", tmp_path / "data", tmp_path / "out", dataset="pcam", progress=False)
    assert [r["key"] for r in result.rows] == ["patch_p4_p16_mean"]
    assert result.rows[0]["n_train"] == 8 and result.rows[0]["epoch_s"] > 0
    for name in ("ablation.csv", "ablation.md", "ablation.png", "meta.json"):
        assert (tmp_path / "out" / name).is_file(), name


@pytest.mark.parametrize("method", ("mean", "gcnn"))
def test_plain_path_matches_fast_path(float64, method: str) -> None:
    """Whole models: the plain paths (explicit patch copies / input-transforming G-convs / materialised attention)
    compute what the fast paths compute."""
    model = build_patch_gevit("rotmnist", "p4m", patch_size=2, embed_method=method, image_size=8, embed_dim=4,
                              gcnn_channels=3, gevit=TWO_LAYERS).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        fast = model(x)
        plain = model.set_impl("plain")(x)
    assert relative_error(plain, fast) < 1e-10
    hybrid = build_hybrid("rotmnist", "p4", image_size=10, gcnn_channels=4, gcnn_layers=2, gcnn_kernel=3,
                          pooled_size=4, gevit=TWO_LAYERS).eval()
    xh = torch.randn(2, 1, 10, 10)
    with torch.no_grad():
        assert relative_error(hybrid.set_impl("plain")(xh), hybrid.set_impl("fast")(xh)) < 1e-10
