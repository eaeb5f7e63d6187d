"""Patch-embedding and hybrid G-CNN -> GE-ViT models (gevit_lib.models.hybrid) and their table (notebook 10).

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


# ---- the model zoo (notebook 10): profile, accuracy, the notebook's table ------------------------------------------
def test_model_zoo_profiles() -> None:
    from gevit_lib.profiles import model_zoo_profile

    quick = model_zoo_profile("rotmnist", "quick")
    assert ("p4", 5, "gevit_p4sa_patch5_rotmnist") in quick.gevit_published  # the published stand-in at quick
    for dataset in ("rotmnist", "pcam"):
        full = model_zoo_profile(dataset, "full")
        assert full.gevit_published == () and ("p4", 5) in full.gevit_trained  # full trains GE-ViT itself
    assert model_zoo_profile("rotmnist", "quick", {"epochs": 9}).epochs == 9
    with pytest.raises(ValueError, match="unknown model-zoo profile field"):
        model_zoo_profile("rotmnist", "quick", {"epoch": 9})
    with pytest.raises(ValueError, match="unknown dataset"):
        model_zoo_profile("cifar", "quick")
    with pytest.raises(ValueError, match="unknown profile"):
        model_zoo_profile("rotmnist", "fast")


def test_equal_compute_profiles() -> None:
    from gevit_lib.profiles import equal_compute_profile

    smoke, quick, full = (equal_compute_profile(p) for p in ("smoke", "quick", "full"))
    assert smoke.budget_s < 10 < quick.budget_s < full.budget_s == 1800  # full: the 30 minutes
    assert quick.n_train is None and "gevit_p4" in quick.families and set(quick.families) <= set(full.families)
    assert all(p.gevit_chunk <= p.chunk for p in (smoke, quick, full))
    assert equal_compute_profile("quick", {"budget_s": 60}).budget_s == 60
    with pytest.raises(ValueError, match="unknown equal-compute profile field"):
        equal_compute_profile("quick", {"budget": 60})
    with pytest.raises(ValueError, match="not defined"):
        equal_compute_profile("tables")


def test_published_gevit_row_is_the_timed_architecture(shared_dir: Path) -> None:
    """The quick table's GE-ViT p4, P=5 row reports the published checkpoint's accuracy next to the speed and size
    of the model the notebook builds: both must be the same architecture (same parameters, same shapes)."""
    from gevit_lib.models import load_published
    from gevit_lib.models.gevit import build_gevit
    from gevit_lib.profiles import model_zoo_profile

    sizes = model_zoo_profile("rotmnist", "quick")
    for group, hood, name in sizes.gevit_published:
        published = load_published(name).state_dict()
        timed = build_gevit("rotmnist", group, patch_size=hood, group_index="corrected",
                            **sizes.gevit_overrides).state_dict()
        assert {k: v.shape for k, v in timed.items()} == {k: v.shape for k, v in published.items()}


def test_posthoc_subgroup_copies_are_c16_copies() -> None:
    """With ``subgroup_exact`` the C4 / C8 copies are every 4th / 2nd C16 copy (same images), so the post-hoc rows
    of the table differ only in the group they pool over."""
    from gevit_lib.models.vit import build_vit
    from gevit_lib.posthoc import PostHoc

    torch.manual_seed(0)
    vit = build_vit("mnist", embed_dim=16, hidden_dim=16, num_heads=2, num_layers=1).eval()
    x = torch.randn(6, 1, 28, 28)
    big = PostHoc(vit, "mean", "C16", subgroup_exact=True).transformed_embeddings(x)
    for group, step in (("C4", 4), ("C8", 2)):
        assert torch.equal(PostHoc(vit, "mean", group, subgroup_exact=True).transformed_embeddings(x), big[:, ::step])


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 noise; label 1 adds a bright 3x3 blob at a random place (a rotation-invariant two-class task)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = 0.5 * torch.randn(n, 1, 8, 8, generator=gen), torch.arange(n) % 2
    for i in range(n):
        r, c = torch.randint(0, 6, (2,), generator=gen).tolist()
        x[i, :, r:r + 3, c:c + 3] += 2.0 * y[i]
    return x, y


def test_patch_model_learns(tmp_path: Path) -> None:
    """The table's accuracy columns come from `fit` on these models: trained the same way (AdamW, warm-up then
    cosine), a tiny patch-embedding model must learn an easy invariant task (chance is 50%)."""
    from gevit_lib.train import TrainConfig, evaluate, fit

    torch.manual_seed(0)
    model = build_patch_gevit("rotmnist", "p4", patch_size=2, image_size=8, embed_dim=8, embed_hidden=16,
                              gevit=TWO_LAYERS)
    config = TrainConfig(epochs=6, batch_size=32, optimizer="adamw", lr=3e-3, weight_decay=0.01,
                         schedule="warmup_cosine", warmup_epochs=1.2)
    result = fit(model, _blobs(256, 0), _blobs(128, 1), config, progress=False)
    accuracy = evaluate(model, _blobs(128, 2))["accuracy"]
    assert result.best_val["accuracy"] >= 0.9 and accuracy >= 0.9, (result.best_val, accuracy)


def test_notebook_10_pcam_row(tmp_path: Path) -> None:
    """Notebook 10 on PCam (lazily read h5 files, random D4 augmentation) with one chosen row: the table holds
    that row, and its test accuracy is the accuracy of the best checkpoint `fit` saved, on the same test images."""
    import csv

    papermill = pytest.importorskip("papermill")
    from gevit_lib.testing import write_fake_pcam
    from gevit_lib.data import pcam, random_subset, take_subset
    from gevit_lib.profiles import model_zoo_profile
    from gevit_lib.reproduce import batch_parameters
    from gevit_lib.train import evaluate

    write_fake_pcam(tmp_path / "data", n_per_split=8)
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    book = notebooks / "10_modern_equivariant_vit.ipynb"
    params = {"profile": "smoke", "device": "cpu", "data_dir": str(tmp_path / "data"), "dataset": "pcam",
              "out_dir": str(tmp_path / "out"), "run_dir": str(tmp_path / "run"), "models": ["patch_p4_p16_mean"]}
    papermill.execute_notebook(str(book), str(tmp_path / "executed.ipynb"), cwd=str(notebooks), progress_bar=False,
                               parameters=batch_parameters(book, params), execution_timeout=900)
    rows = list(csv.DictReader((tmp_path / "out" / "model_zoo.csv").open()))
    assert [r["name"] for r in rows] == ["Patch GE-ViT p4, patch 16 (mean embedding)"]
    assert rows[0]["n_train"] == "8" and rows[0]["epochs"] == "1" and float(rows[0]["epoch_s"]) > 0
    assert json.loads((tmp_path / "out" / "ablation.json").read_text())["data_points"][0]["patch_size"] == 16
    sizes = model_zoo_profile("pcam", "smoke")
    model = build_patch_gevit("pcam", "p4", patch_size=16, embed_method="mean", gevit=sizes.grid_gevit,
                              embed_hidden=sizes.embed_hidden, embed_dim=sizes.embed_dim)
    model.load_state_dict(torch.load(tmp_path / "run" / "smoke" / "runs" / "patch_p4_p16_mean" / "best.pt",
                                     weights_only=True))
    split = pcam("test", root=tmp_path / "data")
    test = take_subset(split, random_subset(len(split), sizes.n_test, 0 + 2))  # the notebook's seed 0, third split
    assert float(rows[0]["test_acc"]) == pytest.approx(100 * evaluate(model, test)["accuracy"], abs=0.005)


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
