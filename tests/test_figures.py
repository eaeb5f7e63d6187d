"""Figure recipes of notebooks 01-05 (gevit_lib.experiments.figures) on tiny untrained models: fixed pixel sizes,
provenance sidecars, and the numbers they report (exact invariance where it must hold, errors where it must not)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gevit_lib.experiments import figures as F
from gevit_lib.models.gevit import GEViT, build_gevit
from gevit_lib.models.vit import build_vit

META = dict(data_source="test digits", checkpoint="tiny untrained", profile="smoke", seed=0)


def tiny(group: str, group_index: str = "corrected", positional: str = "gevit", **kw) -> GEViT:
    """lift -> one group layer -> classifier on 28 x 28 images, the library's random initialisation, float64."""
    opts = dict(num_channels=8, num_heads=2, block_sizes=(1,), crop_per_layer=(0,), num_classes=2,
                attention_dropout=0.0, value_dropout=0.0)
    opts.update(kw)
    torch.manual_seed(0)
    model = build_gevit("rotmnist", group, patch_size=5, group_index=group_index, positional=positional, **opts)
    return model.double().eval()


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("mnist", embed_dim=8, hidden_dim=16, num_heads=2, num_layers=1, dropout=0.0).double().eval()


def digits(n: int = 2) -> torch.Tensor:
    """Raw [0, 1] images with an off-centre blob and a bar, not symmetric under any rotation or mirror."""
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:20, 9:13] = 1.0
    x[:, :, 6:10, 9:22] = 0.8
    return (x * (0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g))).double()


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def gif_info(path: Path) -> tuple[tuple[int, int], int, int]:
    with Image.open(path) as im:
        return im.size, im.n_frames, im.info.get("duration", 0)


# ---- helpers ---------------------------------------------------------------------------------------------------
def test_rotate_translate_and_profiles() -> None:
    x = digits(1)
    assert torch.equal(F.rotate(x, 90), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(F.rotate(x, 450), F.rotate(x, 90)) and torch.equal(F.rotate(x, -90), F.rotate(x, 270))
    ones = torch.ones(1, 1, 28, 28)
    r45 = F.rotate(ones, 45)
    assert r45[..., 0, 0].item() == 0.0 and r45[..., 14, 14].item() == pytest.approx(1.0)  # black corners
    t = F.translate(x, -3, -3)
    assert torch.equal(t[..., :-3, :-3], x[..., 3:, 3:]) and t[..., -3:, :].abs().sum() == 0
    with pytest.raises(ValueError, match="interpolation"):
        F.rotate(x, 30, "cubic")
    with pytest.raises(ValueError, match="unknown profile"):
        F.figure_profile("huge")
    smoke, quick = F.figure_profile("smoke"), F.figure_profile("quick")
    assert smoke.rotation_frames < quick.rotation_frames and len(smoke.sweep_angles) < len(quick.sweep_angles)


def test_digit_selection_rules() -> None:
    class Labels:
        labels = np.array([1, 3, 8, 2, 3, 8, 8, 3])

    ds = Labels()
    assert F.pick_digits(ds, [3, 8]) == [1, 2]
    assert F.pick_digits(ds, [8], start=4, among=(3, 8)) == [6]  # subset 1, 2, 4, 5, 6, 7: from its 5th on
    assert F.first_digits(ds, 3) == [1, 2, 4]
    assert F.pick_digits(ds, [3, 8], among=(3, 8), count=2) == [1, 4, 2, 5]
    with pytest.raises(ValueError, match="label 5"):
        F.pick_digits(ds, [5])
    with pytest.raises(ValueError, match="only"):
        F.first_digits(ds, 9)


def test_figures_refuse_missing_provenance(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="provenance missing"):
        F.save(F.new_figure((100, 50), 50), tmp_path / "x.png", meta={"profile": "smoke"})


# ---- Fig 1 -----------------------------------------------------------------------------------------------------
def test_rotation_animation(tmp_path: Path) -> None:
    views = {"GE-ViT": F.ModelView(tiny("p4", num_classes=10), "tiny p4"),
             "Vision Transformer": F.ModelView(tiny_vit(), "tiny vit", transpose=True)}
    x = digits(1)[0]
    assert torch.equal(views["Vision Transformer"].view(x), x.transpose(-1, -2))
    result = F.rotation_animation(views, x, 8, 4, tmp_path, meta=META)
    assert result.angles.tolist() == [0.0, 90.0, 180.0, 270.0]
    for probs in result.probabilities.values():
        assert probs.shape == (4, 10) and torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-5)
    # the p4 model is exactly invariant to the quarter turns: the same probabilities in every frame
    assert torch.allclose(result.probabilities["GE-ViT"], result.probabilities["GE-ViT"][:1].expand(4, -1), atol=1e-6)
    size, frames, duration = gif_info(result.gif)
    assert size == F.ROTATION_SIZE and frames == 4 and duration > 0
    meta = json.loads((tmp_path / "Rotation.json").read_text())
    assert meta["profile"] == "smoke" and meta["model_inputs"]["Vision Transformer"].startswith("transposed")
    assert meta["files"][0] == "Rotation.gif" and (result.mp4 is None or meta["files"][1] == "Rotation.mp4")
    frame = F.rotation_frame_at(views, x, 30.0, 8)
    assert frame.shape == (F.ROTATION_SIZE[1], F.ROTATION_SIZE[0], 3)


# ---- Figs 3-5 --------------------------------------------------------------------------------------------------
def test_index_grids_follow_the_spec() -> None:
    gevit, gsa = F.index_grids("p4m", 5, "gevit"), F.index_grids("p4m", 5, "gsa")
    offsets = torch.linspace(-1, 1, 5, dtype=torch.float64)
    rows, cols = offsets.view(-1, 1).expand(5, 5), offsets.view(1, -1).expand(5, 5)
    assert torch.allclose(gevit[0, ..., 0], rows) and torch.allclose(gevit[0, ..., 1], cols)
    assert torch.allclose(gevit[1, ..., 0], cols, atol=1e-12)  # g1: the row index runs left -> right
    assert torch.allclose(gevit[4, ..., 0], rows) and torch.allclose(gevit[4, ..., 1], -cols)  # mirror
    assert torch.allclose(gsa[1, ..., 0], gevit[3, ..., 0], atol=1e-12)  # GSA turns the other way round
    model = tiny("p4m")
    assert torch.allclose(F.index_grids(model), gevit.to(torch.float64), atol=1e-6)


def test_embedding_figures_have_the_originals_sizes(tmp_path: Path) -> None:
    model = tiny("p4m")
    grids = F.index_grids(model)
    row, col = F.transformed_embedding(model, 1, "row"), F.transformed_embedding(model, 1, "col")
    assert row.shape[:3] == (8, 5, 5) and col.shape == row.shape
    figs = {"row_embd_idxs.png": (F.plot_index_grids(grids[..., 0], "Row embedding indices"), F.INDEX_GRID_SIZE),
            "row_embd_final.png": (F.plot_row_embedding(row), F.ROW_EMBEDDING_SIZE),
            "combined_embd.png": (F.plot_combined_embedding(row, col), F.COMBINED_SIZE),
            "gsa.png": (F.plot_gsa_vs_gevit("p4m", note="note"), F.GSA_VS_GEVIT_SIZE)}
    for name, (fig, size) in figs.items():
        path = F.save(fig, tmp_path / name, meta=META, extra_number=1.5)
        assert image_size(path) == size, name
        assert json.loads(path.with_suffix(".json").read_text())["extra_number"] == 1.5


def test_encoding_invariance_separates_gsa_from_gevit() -> None:
    rows = F.encoding_invariance(F.normalize(digits(1)), "p4", seed=0, num_channels=8, num_heads=2,
                                 block_sizes=(1,), crop_per_layer=(0,), attention_dropout=0.0, value_dropout=0.0)
    errors = {r["encoding"]: r["max_rot90"] for r in rows}
    assert errors["GE-ViT"] < 1e-9 and errors["GSA-Nets grid + consistent group table"] < 1e-9
    assert errors["GSA-Nets"] > 1e-6


# ---- Fig 6 -----------------------------------------------------------------------------------------------------
def test_attention_animation_and_lifting_equivariance(tmp_path: Path) -> None:
    model = tiny("p4m")
    path, at_centre = F.attention_animation(model, digits(2), ["3", "8"], tmp_path / "attn.gif", meta=META)
    assert at_centre.shape == (2, 2, 8, 5, 5)
    assert torch.allclose(at_centre.sum((-2, -1)), torch.ones(2, 2, 8, dtype=at_centre.dtype))
    assert gif_info(path) == (F.ATTENTION_SIZE, 2, 2000)
    assert F.lifting_equivariance_error(model, digits(1)) < 1e-8


# ---- Fig 7 -----------------------------------------------------------------------------------------------------
def test_latent_animation_reports_the_p4m_defect_and_the_fix(tmp_path: Path) -> None:
    x = digits(1)[0]
    results = {}
    for table in ("reference", "corrected"):
        results[table] = F.latent_animation(tiny("p4m", group_index=table), x, tmp_path / f"{table}.gif", meta=META,
                                            transforms=("original", "rotate 90", "mirror", "translate"),
                                            exact=("rot90", "rot180", "flip"), class_names=("3", "8"))
    assert max(results["corrected"].invariance.values()) < 1e-9
    assert results["reference"].invariance["rot90"] > 1e-6
    res = results["corrected"]
    assert gif_info(res.gif)[:2] == (F.LATENT_SIZE, 4)
    rows = res.rows()
    assert [r["frame"] for r in rows] == ["original", "rotate 90", "mirror", "translate"]
    assert rows[0]["logit(3)"] == pytest.approx(rows[1]["logit(3)"], rel=1e-9)
    sidecar = json.loads((tmp_path / "corrected.json").read_text())
    assert set(sidecar["invariance_error"]) == {"rot90", "rot180", "flip"} and len(sidecar["logits"]) == 4


# ---- Fig 8 -----------------------------------------------------------------------------------------------------
def test_steerability_exact_at_quarter_turns_only(tmp_path: Path) -> None:
    model = F.steerability_model(0, num_channels=8, num_heads=2, block_sizes=(1,), crop_per_layer=(0,)).double()
    fig, logits = F.steerability_figure(model, digits(1)[0])
    ref = logits[0].abs().max()
    assert (logits[0::2] - logits[0]).abs().max() / ref < 1e-9  # 0, 90, 180, 270 degrees
    assert (logits[1::2] - logits[0]).abs().max() / ref > 1e-6  # 45, 135, ... interpolated
    assert image_size(F.save(fig, tmp_path / "not_steerable.png", meta=META)) == F.STEER_SIZE


def test_invariance_sweep_table_and_plot(tmp_path: Path) -> None:
    views = {"p4": F.ModelView(tiny("p4"), "tiny p4"), "ViT": F.ModelView(tiny_vit(), "tiny vit")}
    angles = (0.0, 45.0, 90.0, 180.0)
    results = F.invariance_vs_angle(views, digits(2), angles)
    err = results["p4"]["error"]
    assert err[0] == 0 and err[2] < 1e-9 and err[3] < 1e-9 and err[1] > 1e-6
    assert results["ViT"]["error"][2] > 1e-6
    rows = F.invariance_rows(angles, results, views)
    assert [r["model"] for r in rows] == ["p4", "ViT"] and rows[0]["error_rot90_multiples_max"] < 1e-9
    assert rows[0]["error_other_angles_mean"] == pytest.approx(float(err[1]))
    csv_path, _ = F.save_invariance_table(rows, tmp_path / "sweep.csv", meta=META)
    assert len(csv_path.read_text().strip().splitlines()) == 3
    path = F.save(F.plot_invariance_vs_angle(angles, results), tmp_path / "sweep.png", meta=META)
    assert image_size(path) == F.SWEEP_SIZE
    assert F.checkpoints_of({"a": F.ModelView(tiny_vit(), "vit + mean C4"),
                             "b": F.ModelView(tiny_vit(), "vit")}) == "vit"
