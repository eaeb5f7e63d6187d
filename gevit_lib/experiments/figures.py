"""The blog post's GE-ViT figures (SPEC 7.1-7.3) as functions: the notebooks 01-05 only call these and show results.

- Fig 1, ``Rotation.gif``: class probabilities of two models while a digit turns (:func:`rotation_animation`).
- Figs 3-5, positional encodings: the transformed offset grids and embeddings of the p4m checkpoint
  (:func:`plot_index_grids`, :func:`plot_row_embedding`, :func:`plot_combined_embedding`), GSA-Nets' grids next
  to GE-ViT's (:func:`plot_gsa_vs_gevit`) and the invariance error each encoding gives (:func:`encoding_invariance`).
- Fig 6, ``GEVIT_attention.gif``: lifting attention around the centre pixel (:func:`attention_animation`).
- Fig 7, ``GEVIT_latent_representations_*.gif``: per-layer features of transformed inputs (:func:`latent_animation`).
- Fig 8, ``not_steerable.png``: logits of a p8 model under 45-degree rotations (:func:`steerability_figure`), and
  the invariance error against the rotation angle for several models (:func:`invariance_vs_angle`).

Every figure has a fixed pixel size (figsize x dpi, no tight bounding box), the same in every profile, and is
written with a provenance sidecar (:func:`gevit_lib.viz.write_sidecar`); every function that writes takes ``meta``
naming data_source, checkpoint, profile and seed. Which digits and checkpoints each figure uses (the post's
choices, SPEC 7) is decided here too: :func:`rotation_digit`, :func:`test_digits`, :func:`rotation_views`,
:func:`p4m_tables`, :func:`sweep_views`; sizes per profile: :func:`figure_profile`. Figures are built with matplotlib's object API on an Agg
canvas, so nothing here needs a display or touches pyplot's global state. Images are ``[B, 1, 28, 28]``: "raw"
means pixel values in [0, 1] (background 0), "normalised" means ``(raw - mean) / std`` as the models expect.
Rotations turn the displayed image counter-clockwise (``torch.rot90(x, 1)``, torchvision ``rotate(+angle)``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from ..data import MNIST_MEAN, MNIST_STD
from ..equivariance import relative_error
from ..groups import Group, get_group, rotate, translate
from ..models.gevit import GEViT, build_gevit
from ..files import atomic_write
from ..nn.positional import relative_coordinates
from ..profiles import check_profile
from ..viz import figure_to_array, save_figure, save_gif, save_mp4, save_table, write_sidecar

__all__ = [
    "FigureProfile",
    "figure_profile",
    "normalize",
    "rotate",
    "translate",
    "pick_digits",
    "first_digits",
    "digit_batch",
    "Digits",
    "rotation_digit",
    "test_digits",
    "new_figure",
    "save",
    "save_gif",
    "save_mp4",
    # Fig 1
    "ROTATION_SIZE",
    "ModelView",
    "rotation_views",
    "RotationResult",
    "rotation_probabilities",
    "render_rotation_frame",
    "rotation_frame_at",
    "rotation_animation",
    # Figs 3-5
    "INDEX_GRID_SIZE",
    "ROW_EMBEDDING_SIZE",
    "COMBINED_SIZE",
    "GSA_VS_GEVIT_SIZE",
    "ENCODINGS",
    "index_grids",
    "plot_index_grids",
    "transformed_embedding",
    "plot_row_embedding",
    "plot_combined_embedding",
    "encoding_invariance",
    "plot_gsa_vs_gevit",
    # Fig 6
    "ATTENTION_SIZE",
    "render_attention_frame",
    "attention_animation",
    "lifting_equivariance_error",
    # Fig 7
    "LATENT_SIZE",
    "LATENT_TRANSFORMS",
    "EXACT_TRANSFORMS",
    "LatentResult",
    "transform_digit",
    "render_latent_frame",
    "latent_animation",
    # Fig 8
    "STEER_SIZE",
    "SWEEP_SIZE",
    "steerability_model",
    "p4m_tables",
    "sweep_views",
    "steerability_figure",
    "rotated_logits",
    "invariance_vs_angle",
    "plot_invariance_vs_angle",
    "checkpoints_of",
    "invariance_rows",
    "save_invariance_table",
]


# ---- profiles ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FigureProfile:
    """Sizes of the figure notebooks at one profile.

    ``rotation_frames``: frames of ``Rotation.gif`` (evenly spaced over 360 degrees); ``latent_transforms``: the
    frames of the latent-representation GIFs; ``exact_transforms``: exact symmetries whose invariance error notebook
    04 measures; ``sweep_angles`` / ``sweep_digits``: angles (degrees) of the invariance sweep of notebook 05 and
    its number of test digits per class (that many 3s and as many 8s).
    """

    rotation_frames: int
    latent_transforms: tuple[str, ...]
    exact_transforms: tuple[str, ...]
    attention_images: int
    sweep_angles: tuple[float, ...]
    sweep_digits: int


_ALL_LATENT = ("original", "rotate 90", "rotate 45", "rotate 20", "mirror", "translate")
FIGURE_PROFILES: dict[str, FigureProfile] = {
    "smoke": FigureProfile(rotation_frames=6, latent_transforms=("original", "rotate 90"),
                           exact_transforms=("rot90",), attention_images=5, sweep_angles=(45.0, 90.0),
                           sweep_digits=1),
    "quick": FigureProfile(rotation_frames=72, latent_transforms=_ALL_LATENT,
                           exact_transforms=("rot90", "rot180", "rot270", "flip"), attention_images=5,
                           sweep_angles=tuple(float(a) for a in range(0, 360, 15)), sweep_digits=1),
    "full": FigureProfile(rotation_frames=360, latent_transforms=_ALL_LATENT,
                          exact_transforms=("rot90", "rot180", "rot270", "flip"), attention_images=5,
                          sweep_angles=tuple(float(a) for a in range(0, 360, 5)), sweep_digits=4),
}


def figure_profile(profile: str) -> FigureProfile:
    """The figure sizes of ``profile`` ("smoke", "quick", "full")."""
    return FIGURE_PROFILES[check_profile(profile)]


# ---- images ----------------------------------------------------------------------------------------------------
def normalize(raw: Tensor) -> Tensor:
    """MNIST normalisation of raw [0, 1] images."""
    return (raw - MNIST_MEAN[0]) / MNIST_STD[0]


def _labels(dataset: Any) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]
    return np.asarray(labels)


def pick_digits(dataset: Any, labels: Sequence[int], start: int = 0, among: Sequence[int] | None = None,
                count: int = 1) -> list[int]:
    """Dataset indices: for each entry of ``labels`` in turn, the first ``count`` images with that label at or after
    position ``start`` of the subset ``among`` (labels kept, e.g. (3, 8); None: the whole dataset). Raises if there
    are fewer."""
    all_labels = _labels(dataset)
    positions = np.arange(len(all_labels)) if among is None else np.flatnonzero(np.isin(all_labels, list(among)))
    chosen: list[int] = []
    for label in labels:
        hits = [int(i) for i in positions[start:] if all_labels[i] == label and int(i) not in chosen][:count]
        if len(hits) < count:
            raise ValueError(f"fewer than {count} images with label {label} at or after position {start} of the "
                             "dataset" + (f" filtered to {list(among)}" if among is not None else ""))
        chosen += hits
    return chosen


def first_digits(dataset: Any, n: int, among: Sequence[int] = (3, 8), start: int = 0) -> list[int]:
    """Indices of the first ``n`` images (after ``start`` of them) whose label is in ``among``."""
    positions = np.flatnonzero(np.isin(_labels(dataset), list(among)))[start:start + n]
    if len(positions) < n:
        raise ValueError(f"only {len(positions)} images with labels {list(among)} (asked for {n})")
    return [int(i) for i in positions]


def digit_batch(dataset: Any, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Images ``[N, 1, H, W]`` and labels ``[N]`` of ``dataset`` at ``indices`` (as the dataset returns them)."""
    items = [dataset[i] for i in indices]
    return torch.stack([im for im, _ in items]), torch.tensor([int(lb) for _, lb in items])


@dataclass
class Digits:
    """Raw digits ``[N, 1, H, W]`` (pixels in [0, 1]) with their digit labels and where they came from."""

    images: Tensor
    labels: Tensor
    indices: list[int]
    split: str
    data_source: str

    def describe(self) -> dict[str, Any]:
        """For provenance sidecars: split, dataset indices and labels."""
        return {"split": self.split, "indices": list(self.indices), "labels": [int(v) for v in self.labels]}


def _split(split: str, profile: str, data_dir: str | os.PathLike[str] | None) -> tuple[Any, str]:
    from ..notebook import rotated_digits

    return rotated_digits(split, profile, data_dir, normalize=False)


def _digits(ds: Any, indices: Sequence[int], split: str, source: str) -> Digits:
    images, labels = digit_batch(ds, indices)
    return Digits(images, labels, list(indices), split, source)


def rotation_digit(profile: str, data_dir: str | os.PathLike[str] | None = None, label: int = 8,
                   position: int = 18) -> Digits:
    """Fig 1's digit: in the rotated-MNIST **training** split filtered to 3s and 8s (as the post), the first
    ``label`` at or after position ``position`` (the post took the 19th image of that subset, an 8); the first
    ``label`` of the subset when the split is too small (smoke data)."""
    ds, source = _split("train", profile, data_dir)
    try:
        indices = pick_digits(ds, [label], start=position, among=(3, 8))
    except ValueError:
        indices = pick_digits(ds, [label], among=(3, 8))
    return _digits(ds, indices, "train", source)


def test_digits(profile: str, data_dir: str | os.PathLike[str] | None = None, n: int = 1,
                labels: Sequence[int] | None = None) -> Digits:
    """Digits of the rotated-MNIST **test** split filtered to 3s and 8s (as the post's figures): the first ``n``
    in order; with ``labels`` the first ``n`` of each label in turn (e.g. ``labels=(3, 8)``: the first 3 and the
    first 8, as the two latent-representation GIFs)."""
    ds, source = _split("test", profile, data_dir)
    indices = first_digits(ds, n) if labels is None else pick_digits(ds, labels, among=(3, 8), count=n)
    return _digits(ds, indices, "test", source)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.get_default_dtype()


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch_size: int = 32) -> Tensor:
    """``model(x)`` in batches, on the model's device and dtype; returned on the CPU."""
    dev, dt = _device(model), _dtype(model)
    return torch.cat([model(x[i:i + batch_size].to(dev, dt)).cpu() for i in range(0, len(x), batch_size)])


# ---- figures ---------------------------------------------------------------------------------------------------
def new_figure(size_px: tuple[int, int], dpi: int) -> Figure:
    """A white matplotlib figure of exactly ``size_px`` = (width, height) pixels at ``dpi`` on an Agg canvas."""
    w, h = size_px
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _render(fig: Figure, dpi: int) -> np.ndarray:
    return figure_to_array(fig, dpi=dpi)


def save(fig: Figure, path: str | os.PathLike[str], *, meta: Mapping[str, Any], **extra: Any) -> Path:
    """Write ``fig`` as a PNG at its own dpi (so its pixel size is exactly its figsize x dpi) with the sidecar;
    ``meta`` must name data_source, checkpoint, profile and seed; ``extra`` adds fields (e.g. measured numbers)."""
    return save_figure(fig, path, dpi=int(fig.dpi), **_check_meta(meta), **extra)


def _check_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in ("data_source", "checkpoint", "profile", "seed") if k not in meta]
    if missing:
        raise ValueError(f"provenance missing: {missing} (every figure records data_source, checkpoint, profile, seed)")
    return dict(meta)


# ==== Fig 1: Rotation.gif ==========================================================================================
ROTATION_SIZE = (600, 420)  # the post's GIF
_ROTATION_DPI = 60  # figsize (10, 7) inches, as the original notebook


@dataclass(frozen=True)
class ModelView:
    """A model with the input convention it was trained on: ``normalise`` (else raw [0, 1] pixels) and
    ``transpose`` (models trained on upright MNIST get rotated-MNIST digits transposed back: rotated-MNIST digits
    are transposed MNIST digits). ``checkpoint`` names where its weights came from (provenance)."""

    model: nn.Module
    checkpoint: str
    normalise: bool = True
    transpose: bool = False

    def view(self, raw: Tensor) -> Tensor:
        """What the model sees of raw images ``[..., H, W]`` (before normalisation)."""
        return raw.transpose(-1, -2) if self.transpose else raw

    def prepare(self, raw: Tensor) -> Tensor:
        """The model's input for raw images."""
        x = self.view(raw)
        return normalize(x) if self.normalise else x

    @torch.no_grad()
    def logits(self, raw: Tensor, batch_size: int = 32) -> Tensor:
        """Logits ``[N, classes]`` (float64, CPU) for raw images ``[N, 1, H, W]``."""
        return _logits(self.model, self.prepare(raw), batch_size).double()


def rotation_views(profile: str, device: str | torch.device = "cpu") -> dict[str, ModelView]:
    """Fig 1's models, as in the post: the published p4 GE-ViT (trained on rotated MNIST: gets the digits as
    stored) and the published ViT trained on upright MNIST (gets them transposed back into MNIST's orientation)."""
    from ..notebook import published_model

    gevit, gevit_ck = published_model("gevit_p4sa_patch5_rotmnist", profile)
    vit, vit_ck = published_model("vit_mnist", profile)
    return {"GE-ViT": ModelView(gevit.to(device), gevit_ck),
            "Vision Transformer": ModelView(vit.to(device), vit_ck, transpose=True)}


@dataclass
class RotationResult:
    """What :func:`rotation_animation` computed and wrote."""

    angles: Tensor  # [A] degrees
    probabilities: dict[str, Tensor]  # model title -> [A, classes]
    label: int
    gif: Path
    mp4: Path | None

    def accuracy(self) -> dict[str, float]:
        """Fraction of the frames in which each model predicts the true class."""
        return {k: float((p.argmax(-1) == self.label).double().mean()) for k, p in self.probabilities.items()}


def rotation_probabilities(view: ModelView, image: Tensor, angles: Sequence[float], *,
                           interpolation: str = "bilinear") -> Tensor:
    """Softmax probabilities ``[A, classes]`` for a raw image ``[1, H, W]`` rotated by each angle (zero fill, i.e.
    black corners, then the model's own input convention)."""
    frames = torch.stack([rotate(image, a, interpolation) for a in angles])  # [A, 1, H, W]
    return torch.softmax(view.logits(frames), -1).float()


def render_rotation_frame(image: Tensor, angle: float, probabilities: Mapping[str, Tensor], label: int | None = None,
                          inputs: Mapping[str, Tensor] | None = None,
                          title: str = "Effect image rotation GE-ViT and Vision Transformer model") -> np.ndarray:
    """One frame (600 x 420 RGB): the rotated raw image ``[1, H, W]`` left; per model a bar chart of its class
    probabilities (true class green, others blue) and, when ``inputs`` gives it, a thumbnail of what it sees."""
    fig = new_figure(ROTATION_SIZE, _ROTATION_DPI)
    n = len(probabilities)
    grid = fig.add_gridspec(n, 3, width_ratios=(2, 0.45, 1), left=0.05, right=0.98, top=0.88, bottom=0.08,
                            hspace=0.55, wspace=0.3)
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(image.squeeze().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"Degree: {angle:g}")
    for row, (name, p) in enumerate(probabilities.items()):
        if inputs is not None and name in inputs:
            thumb = fig.add_subplot(grid[row, 1])
            thumb.imshow(inputs[name].squeeze().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            thumb.set_title("its input", fontsize=9)
            thumb.set_xticks([])
            thumb.set_yticks([])
        bar = fig.add_subplot(grid[row, 2])
        classes = len(p)
        colors = ["tab:green" if c == label else "tab:blue" for c in range(classes)]
        bar.bar(range(classes), p.cpu().numpy(), color=colors)
        bar.set_ylim(0, 1)
        bar.set_xticks(range(classes))
        bar.set_yticks(np.linspace(0, 1, 6))
        bar.set_title(name)
        bar.set_xlabel("Number")
        bar.set_ylabel("Probability")
    fig.suptitle(title)
    return _render(fig, _ROTATION_DPI)


def rotation_frame_at(views: Mapping[str, ModelView], image: Tensor, angle: float, label: int | None = None,
                      interpolation: str = "bilinear") -> np.ndarray:
    """:func:`render_rotation_frame` at one angle, computing the probabilities now (for an interactive slider)."""
    rotated = rotate(image, angle, interpolation)
    probs = {name: torch.softmax(v.logits(rotated[None]), -1)[0].float() for name, v in views.items()}
    return render_rotation_frame(rotated, angle, probs, label, {name: v.view(rotated) for name, v in views.items()})


def rotation_animation(views: Mapping[str, ModelView], image: Tensor, label: int, n_frames: int,
                       out_dir: str | os.PathLike[str], *, meta: Mapping[str, Any], interpolation: str = "bilinear",
                       loop_seconds: float = 6.0, name: str = "Rotation") -> RotationResult:
    """The post's Fig 1: the raw image ``[1, H, W]`` turned through ``n_frames`` angles evenly spaced over
    [0, 360) and every model's class probabilities. Writes ``<name>.gif`` and, when imageio-ffmpeg is installed,
    ``<name>.mp4`` (each lasting ``loop_seconds``), with one provenance sidecar ``<name>.json`` for both."""
    meta = _check_meta(meta)
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    angles = torch.arange(n_frames, dtype=torch.float64) * (360.0 / n_frames)
    probs = {title: rotation_probabilities(v, image, angles.tolist(), interpolation=interpolation)
             for title, v in views.items()}
    frames = []
    for i, a in enumerate(angles.tolist()):
        rotated = rotate(image, a, interpolation)
        frames.append(render_rotation_frame(rotated, a, {k: p[i] for k, p in probs.items()}, label,
                                            {k: v.view(rotated) for k, v in views.items()}))
    out = Path(out_dir)
    frame_ms = max(20.0, 1000.0 * loop_seconds / n_frames)
    fps = max(1, round(n_frames / loop_seconds))
    gif = save_gif(frames, out / f"{name}.gif", duration_ms=frame_ms, sidecar=False)
    mp4 = save_mp4(frames, out / f"{name}.mp4", fps=fps, sidecar=False)
    write_sidecar(out / f"{name}.json", [gif] + ([mp4] if mp4 else []), frames=len(frames), frame_ms=frame_ms,
                  mp4_fps=fps if mp4 else None, angle_step_deg=360.0 / n_frames, label=int(label),
                  interpolation=interpolation,
                  model_inputs={k: ("transposed, " if v.transpose else "") + ("normalised" if v.normalise else "raw")
                          for k, v in views.items()},
                  frames_correct={k: int((p.argmax(-1) == label).sum()) for k, p in probs.items()}, **meta)
    return RotationResult(angles=angles, probabilities=probs, label=int(label), gif=gif, mp4=mp4)


# ==== Figs 3-5: positional encodings ===============================================================================
INDEX_GRID_SIZE = (792, 360)  # figsize (11, 5) at 72 dpi, as the originals
ROW_EMBEDDING_SIZE = (936, 576)  # (13, 8) at 72 dpi
COMBINED_SIZE = (720, 288)  # (10, 4) at 72 dpi
GSA_VS_GEVIT_SIZE = (960, 600)
_EMBD_DPI = 72

# name -> (positional convention, group-index table): the published codes and the fix that keeps GSA's grid
ENCODINGS: dict[str, tuple[str, str]] = {
    "GSA-Nets": ("gsa", "reference"),
    "GE-ViT": ("gevit", "reference"),
    "GSA-Nets grid + consistent group table": ("gsa", "corrected"),
}


def index_grids(source: GEViT | Group | str, patch_size: int = 5, positional: str = "gevit",
                layer: int = 0) -> Tensor:
    """Transformed offset grids ``[G, P, P, 2]`` (``[..., 0]`` feeds the row embedding, ``[..., 1]`` the column
    embedding): of attention layer ``layer`` of a model (0 = lifting), or computed for a group."""
    if isinstance(source, GEViT):
        return source.attention_layers()[layer].pos.coords.detach().double().cpu()
    return relative_coordinates(get_group(source), patch_size, positional)


def _grid_axes(fig: Figure, rows: int, cols: int, **kw: Any) -> np.ndarray:
    return np.asarray(fig.subplots(rows, cols, squeeze=False, **kw))


def plot_index_grids(grids: Tensor, title: str, size: tuple[int, int] = INDEX_GRID_SIZE) -> Figure:
    """Fig 3: one P x P grid per group element (2 rows), titled g_i, values in [-1, 1], colour bar on the last."""
    g = grids.shape[0]
    cols = max(1, math.ceil(g / 2)) if g > 1 else 1
    rows = math.ceil(g / cols)
    fig = new_figure(size, _EMBD_DPI)
    axes = _grid_axes(fig, rows, cols)
    im = None
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < g:
            im = ax.imshow(grids[i].cpu().numpy(), cmap="viridis", vmin=-1, vmax=1)
            ax.set_title(f"$g_{{{i}}}$")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel()[g - 1])
    fig.suptitle(title)
    return fig


def transformed_embedding(model: GEViT, layer: int = 1, which: str = "row") -> Tensor:
    """Fig 4 data: attention layer ``layer``'s row (or column) embedding MLP applied to its own transformed
    offsets, ``[G, P, P, channels]`` (layer 1 = the first group self-attention layer, as in the post)."""
    pos = model.attention_layers()[layer].pos
    if which not in ("row", "col"):
        raise ValueError(f"which must be 'row' or 'col', got {which!r}")
    coords = pos.coords[..., 0 if which == "row" else 1]
    with torch.no_grad():
        return (pos.row if which == "row" else pos.col)(coords).detach().cpu()


def plot_row_embedding(values: Tensor, channel: int = 0) -> Figure:
    """Fig 4: channel ``channel`` of the transformed row embedding ``[G, P, P, C]`` for every group element."""
    g = values.shape[0]
    cols = max(1, math.ceil(g / 2)) if g > 1 else 1
    rows = math.ceil(g / cols)
    fig = new_figure(ROW_EMBEDDING_SIZE, _EMBD_DPI)
    axes = _grid_axes(fig, rows, cols)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < g:
            ax.imshow(values[i, ..., channel].numpy(), cmap="viridis")
            ax.set_title(f"$g_{{{i}}}$")
    fig.suptitle(f"Channel {channel} of transformed row embedding")
    return fig


def plot_combined_embedding(row: Tensor, col: Tensor, element: int = 0, channel: int = 0) -> Figure:
    """Fig 5: channel ``channel`` of the row embedding, the column embedding and their sum for one group element
    (``row``, ``col``: ``[G, P, P, C]`` from :func:`transformed_embedding`)."""
    fig = new_figure(COMBINED_SIZE, _EMBD_DPI)
    axes = _grid_axes(fig, 1, 3).ravel()
    r, c = row[element, ..., channel], col[element, ..., channel]
    for ax, data, name in zip(axes, (r, c, r + c), ("Row embedding", "Column embedding", "Combined")):
        ax.imshow(data.numpy(), cmap="viridis")
        ax.set_title(name)
        ax.axis("off")
    return fig


def encoding_invariance(image: Tensor, group: str = "p4", *, seed: int = 0, dtype: torch.dtype = torch.float64,
                        encodings: Mapping[str, tuple[str, str]] = ENCODINGS, preset: str = "rotmnist",
                        **overrides: Any) -> list[dict[str, Any]]:
    """Relative logit change ``max|f(rot90^k x) - f(x)| / max|f(x)|`` (k = 1, 2, 3) of randomly initialised models
    (same seed for each) that differ only in the positional encoding: one row per entry of ``encodings``
    (name -> (positional, group_index)). ``image``: a normalised ``[1, 1, H, W]`` input."""
    grp = get_group(group)
    rows = []
    for name, (positional, table) in encodings.items():
        torch.manual_seed(seed)
        model = build_gevit(preset, grp.name, positional=positional, group_index=table, **overrides).to(dtype).eval()
        x = image.to(dtype)
        with torch.no_grad():
            ref = model(x)
            errs = {f"rot{90 * k}": relative_error(model(torch.rot90(x, k, dims=(-2, -1))), ref) for k in (1, 2, 3)}
        rows.append({"encoding": name, "positional": positional, "group_index": table, "group": grp.name,
                     **errs, "max_rot90": max(errs.values()), "dtype": str(dtype).replace("torch.", "")})
    return rows


def plot_gsa_vs_gevit(group: str = "p4m", patch_size: int = 5, note: str | None = None) -> Figure:
    """The row and column offset grids of GE-ViT's and GSA-Nets' encodings side by side (4 rows x |G|).

    GSA-Nets rotates the (row, column) vector, GE-ViT the (x = column, y = row) vector with the same matrix: the
    encoding turns the other way round, and GSA mirrors by flipping the array (mirror then rotate) where GE-ViT
    mirrors after rotating. ``note`` (e.g. the measured errors) is printed under the title.
    """
    grp = get_group(group)
    grids = {"gevit": relative_coordinates(grp, patch_size, "gevit"), "gsa": relative_coordinates(grp, patch_size, "gsa")}
    fig = new_figure(GSA_VS_GEVIT_SIZE, 80)
    axes = _grid_axes(fig, 4, len(grp), gridspec_kw=dict(left=0.14, right=0.9, top=0.84, bottom=0.02, hspace=0.25))
    labels = [("gevit", 0, "GE-ViT\nrow"), ("gsa", 0, "GSA-Nets\nrow"), ("gevit", 1, "GE-ViT\ncolumn"),
              ("gsa", 1, "GSA-Nets\ncolumn")]
    im = None
    for r, (kind, channel, label) in enumerate(labels):
        for g in range(len(grp)):
            ax = axes[r, g]
            im = ax.imshow(grids[kind][g, ..., channel].numpy(), cmap="viridis", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"$g_{{{g}}}$")
            if g == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02)
    fig.suptitle(f"Transformed offset grids of {grp.name}: GE-ViT vs GSA-Nets (patch {patch_size})")
    if note:
        fig.text(0.5, 0.905, note, ha="center", va="center", fontsize=9)
    return fig


# ==== Fig 6: GEVIT_attention.gif ===================================================================================
ATTENTION_SIZE = (576, 144)  # figsize (8, 2) at 72 dpi
_ATTN_DPI = 72
_ATTN_PANELS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (head, group element)


def render_attention_frame(image: Tensor, target: str, probs: Tensor, centre: tuple[int, int] = (14, 14),
                           panels: Sequence[tuple[int, int]] = _ATTN_PANELS) -> np.ndarray:
    """One frame (576 x 144): the raw image ``[1, H, W]``, the P x P crop around ``centre`` and the lifting
    attention of (head, group element) ``panels`` at ``centre`` (``probs``: ``[heads, G, P, P]`` at that pixel)."""
    fig = new_figure(ATTENTION_SIZE, _ATTN_DPI)
    axes = _grid_axes(fig, 1, 2 + len(panels), gridspec_kw=dict(left=0.01, right=0.99, top=0.8, bottom=0.02,
                                                                  wspace=0.15)).ravel()
    img = image.squeeze().cpu()
    p = probs.shape[-1]
    i, j = centre
    crop = img[i - p // 2:i + p // 2 + 1, j - p // 2:j + p // 2 + 1]
    axes[0].imshow(img.numpy(), cmap="gray")
    axes[0].set_title(f"Target: {target}", fontsize=10)
    axes[1].imshow(crop.numpy(), cmap="gray")
    axes[1].set_title("Center pixel", fontsize=10)
    for ax, (h, g) in zip(axes[2:], panels):
        ax.imshow(probs[h, g].cpu().numpy(), cmap="viridis")
        ax.set_title(f"$MHA_{{{h}}}, g_{{{g}}}$", fontsize=10)
    for ax in axes:
        ax.axis("off")
    return _render(fig, _ATTN_DPI)


def attention_animation(model: GEViT, images: Tensor, targets: Sequence[str], path: str | os.PathLike[str], *,
                        meta: Mapping[str, Any], centre: tuple[int, int] = (14, 14),
                        panels: Sequence[tuple[int, int]] = _ATTN_PANELS, frame_ms: float = 2000) -> tuple[Path, Tensor]:
    """Fig 6: one frame per raw image ``[N, 1, H, W]``: the lifting attention probabilities of ``model`` at the
    ``centre`` pixel. Returns the GIF path and the probabilities ``[N, heads, G, P, P]`` at the centre."""
    meta = _check_meta(meta)
    with torch.no_grad():
        maps = model.attention_maps(normalize(images).to(_device(model), _dtype(model)), layer=0).cpu()
    at_centre = maps[:, :, :, centre[0], centre[1]]  # [N, heads, G, P, P]
    frames = [render_attention_frame(images[n], targets[n], at_centre[n], centre, panels) for n in range(len(images))]
    path = save_gif(frames, path, duration_ms=frame_ms, centre=list(centre), panels=[list(p) for p in panels],
                    targets=list(targets), **meta)
    return path, at_centre


@torch.no_grad()
def lifting_equivariance_error(model: GEViT, images: Tensor, k: int = 1) -> float:
    """Largest absolute difference between the lifting attention of ``rot90(x, k)`` and the attention of ``x``
    transformed the way the features transform (group axis permuted by the model's regular action, pixel and
    neighbourhood axes rotated), for raw images ``[N, 1, H, W]``: ~1e-7 in float32 for an equivariant layer."""
    group = model.group
    t = group.rot90_element(k)
    perm = group.right_regular(t) if model.feature_side == "right" else group.left_regular(t)
    x = normalize(images).to(_device(model), _dtype(model))
    maps = model.attention_maps(x, layer=0)  # [N, heads, G, H, W, P, P]
    rotated = model.attention_maps(torch.rot90(x, k, dims=(-2, -1)), layer=0)
    expected = torch.rot90(torch.rot90(maps.index_select(2, perm.to(maps.device)), k, dims=(3, 4)), k, dims=(5, 6))
    return float((rotated - expected).abs().max())


# ==== Fig 7: GEVIT_latent_representations_*.gif =====================================================================
LATENT_SIZE = (720, 432)  # figsize (10, 6) at 72 dpi
_LATENT_DPI = 72
LATENT_TRANSFORMS: tuple[str, ...] = _ALL_LATENT
EXACT_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(-2, -1)),
    "flip": lambda x: torch.flip(x, dims=(-1,)),
}
_LATENT_ROWS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (group element, channel)


def transform_digit(image: Tensor, name: str) -> Tensor:
    """The latent-GIF frames (SPEC 7.1) of a raw image: "original", "rotate 90" (exact), "rotate 45", "rotate 20"
    (nearest neighbour, as PIL's default), "mirror" (W axis), "translate" (content 3 px up and left), or an exact
    transform of :data:`EXACT_TRANSFORMS`."""
    if name == "original":
        return image
    if name in EXACT_TRANSFORMS:
        return EXACT_TRANSFORMS[name](image)
    if name.startswith("rotate "):
        return rotate(image, float(name.split()[1]), "nearest")
    if name == "mirror":
        return torch.flip(image, dims=(-1,))
    if name == "translate":
        return translate(image, -3, -3)
    raise ValueError(f"unknown transform {name!r}; use one of {LATENT_TRANSFORMS + tuple(EXACT_TRANSFORMS)}")


def render_latent_frame(image: Tensor, features: Sequence[Tensor], caption: str | None = None,
                        rows: Sequence[tuple[int, int]] = _LATENT_ROWS) -> np.ndarray:
    """One frame (720 x 432): per row (group element g, channel c) the raw input ``[1, H, W]`` and
    ``features[layer][c, g]`` of every layer (each ``[C, G, H, W]`` of one image)."""
    fig = new_figure(LATENT_SIZE, _LATENT_DPI)
    top = 0.86 if caption else 0.94
    axes = _grid_axes(fig, len(rows), 1 + len(features),
                      gridspec_kw=dict(left=0.01, right=0.99, top=top, bottom=0.01, wspace=0.1, hspace=0.3))
    img = image.squeeze().cpu().numpy()
    for r, (g, c) in enumerate(rows):
        axes[r, 0].imshow(img, cmap="gray")
        axes[r, 0].set_title(f"$g_{{{g}}}, c_{{{c}}}$", fontsize=10)
        for layer, feat in enumerate(features):
            ax = axes[r, 1 + layer]
            ax.imshow(feat[c, g].cpu().float().numpy(), cmap="viridis")
            if r == 0:
                ax.set_title(f"layer {layer}", fontsize=10)
    for ax in axes.ravel():
        ax.axis("off")
    if caption:
        fig.suptitle(caption, fontsize=10)
    return _render(fig, _LATENT_DPI)


@dataclass
class LatentResult:
    """What :func:`latent_animation` computed and wrote."""

    transforms: tuple[str, ...]
    logits: Tensor  # [frames, classes], float64
    invariance: dict[str, float]  # exact transform -> relative logit change
    gif: Path
    class_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def probabilities(self) -> Tensor:
        return torch.softmax(self.logits, -1)

    def rows(self) -> list[dict[str, Any]]:
        """One row per frame: transform, predicted class, its probability, every class's logit and probability."""
        out = []
        for name, z, p in zip(self.transforms, self.logits, self.probabilities):
            names = self.class_names or tuple(str(i) for i in range(len(p)))
            out.append({"frame": name, "predicted": names[int(p.argmax())], "probability": float(p.max()),
                        **{f"logit({n})": float(v) for n, v in zip(names, z)},
                        **{f"p({n})": float(v) for n, v in zip(names, p)}})
        return out


def latent_animation(model: GEViT, image: Tensor, path: str | os.PathLike[str], *, meta: Mapping[str, Any],
                     transforms: Sequence[str] = LATENT_TRANSFORMS, exact: Sequence[str] = tuple(EXACT_TRANSFORMS),
                     class_names: Sequence[str] = (), frame_ms: float = 2000) -> LatentResult:
    """Fig 7: for each transform of the raw image ``[1, H, W]``, the features of every layer (4 x (1 + layers)
    panels), as a GIF. Also the class probabilities per frame and the relative logit change under the ``exact``
    transforms (rot90 / rot180 / rot270 / flip: exact pixel permutations, so an invariant model gives ~0)."""
    meta = _check_meta(meta)
    same = {"rot90": "rotate 90", "flip": "mirror"}  # exact transforms that are also frames: computed once
    names = list(transforms) + [n for n in ("original", *exact) if n not in transforms and same.get(n) not in transforms]
    inputs = torch.stack([transform_digit(image, n) for n in names])  # [F, 1, H, W]
    dev, dt = _device(model), _dtype(model)
    with torch.no_grad():
        feats = [f.cpu() for f in model.forward_intermediates(normalize(inputs).to(dev, dt))]
    logits = GEViT.pool(feats[-1]).double()
    ref = logits[names.index("original")]
    invariance = {e: relative_error(logits[names.index(e if e in names else same[e])], ref) for e in exact}
    frame_logits = logits[:len(transforms)]
    probs = torch.softmax(frame_logits, -1)
    cls = tuple(class_names) or tuple(str(i) for i in range(probs.shape[-1]))
    frames = []
    for i, name in enumerate(transforms):
        p, z = probs[i], frame_logits[i]
        values = ", ".join(f"{float(v):.3f}" for v in z)
        caption = f"{name}: predicted {cls[int(p.argmax())]} (p = {float(p.max()):.5f}), logits ({values})"
        frames.append(render_latent_frame(inputs[i], [f[i] for f in feats], caption))
    gif = save_gif(frames, path, duration_ms=frame_ms, transforms=list(transforms),
                   logits=[[round(float(v), 6) for v in z] for z in frame_logits], class_names=list(cls),
                   invariance_error=invariance, **meta)
    return LatentResult(tuple(transforms), frame_logits, invariance, gif, cls)


# ==== Fig 8: not_steerable.png and the invariance sweep =============================================================
STEER_SIZE = (1200, 600)  # figsize (12, 6) at 100 dpi
SWEEP_SIZE = (1200, 500)
_STEER_DPI = 100


def steerability_model(seed: int = 0, group: str = "p8", **overrides: Any) -> GEViT:
    """The post's Fig 8 model: an untrained GE-ViT (``seed``) with one block of two layers (crops 2, 0), 2 classes,
    local patch 5, eval mode (SPEC 7.3); ``overrides`` replace config fields (e.g. for tiny test models)."""
    torch.manual_seed(seed)
    options = dict(block_sizes=(2,), crop_per_layer=(2, 0))
    options.update(overrides)
    return build_gevit("rotmnist", group, num_classes=2, **options).eval()


def p4m_tables(profile: str, device: str | torch.device = "cpu") -> dict[str, tuple[GEViT, str]]:
    """The published p4m checkpoint twice: ``"reference"`` (the group-index table it was trained with: the
    published, non-equivariant model) and ``"corrected"`` (the same weights with the exactly equivariant table,
    a model nobody trained), each with its provenance label."""
    import warnings

    from ..notebook import published_model

    out = {}
    for table in ("reference", "corrected"):
        with warnings.catch_warnings():  # the loader warns that "corrected" is not what was trained: we say so
            warnings.filterwarnings("ignore", message=".*group-index table.*")
            model, label = published_model("gevit_p4msa_patch5_rotmnist", profile, group_index=table)
        out[table] = (model.to(device).eval(), f"{label} (group_index={table!r})")
    return out


def sweep_views(profile: str, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, ModelView]:
    """The invariance sweep's models: GE-ViT p4 (published), p8 (untrained, :func:`steerability_model`), p4m
    (published, reference and corrected table), the ViT trained on rotated MNIST and its post-hoc mean-pooling
    wrappers over C4, D4 and C16 (the original's stacks: nearest interpolation, 0-filled corners)."""
    from ..posthoc import PostHoc
    from ..notebook import published_model

    p4, p4_ck = published_model("gevit_p4sa_patch5_rotmnist", profile)
    tables = p4m_tables(profile, device)
    vit, vit_ck = published_model("vit_rotmnist", profile)
    vit = vit.to(device).eval()
    views = {
        "GE-ViT p4 (published)": ModelView(p4.to(device), p4_ck),
        "GE-ViT p8 (untrained, raw input)": ModelView(steerability_model(seed).to(device),
                                                      f"untrained p8 GE-ViT (seed {seed})", normalise=False),
        "GE-ViT p4m (published table)": ModelView(*tables["reference"]),
        "GE-ViT p4m (corrected table)": ModelView(*tables["corrected"]),
        "ViT": ModelView(vit, vit_ck),
    }
    for group in ("C4", "D4", "C16"):
        views[f"ViT + post-hoc mean {group}"] = ModelView(PostHoc(vit, "mean", group).eval(), f"{vit_ck} + mean {group}")
    return views


def steerability_figure(model: nn.Module, image: Tensor, steps: int = 8, normalise_input: bool = False,
                        interpolation: str = "bilinear") -> tuple[Figure, Tensor]:
    """Fig 8: the raw image ``[1, H, W]`` rotated by ``k * 360 / steps`` degrees (k = 0..steps-1, bilinear for the
    non-multiples of 90), each titled with the model's logits; returns the figure and the logits ``[steps, C]``.
    The post fed the raw (not normalised) image; ``normalise_input`` normalises it first."""
    angles = [k * 360.0 / steps for k in range(steps)]
    inputs = torch.stack([rotate(image, a, interpolation) for a in angles])
    logits = _logits(model, normalize(inputs) if normalise_input else inputs).double()
    fig = new_figure(STEER_SIZE, _STEER_DPI)
    cols = max(1, steps // 2)
    axes = _grid_axes(fig, math.ceil(steps / cols), cols,
                      gridspec_kw=dict(left=0.01, right=0.99, top=0.93, bottom=0.01, wspace=0.05, hspace=0.12))
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < steps:
            ax.imshow(inputs[k].squeeze().numpy(), cmap="gray")
            values = ", ".join(f"{float(v):.2f}" for v in logits[k])
            ax.set_title(f"{angles[k]:g}°  Logits: ({values})", fontsize=11)
    return fig, logits


def rotated_logits(view: ModelView, images: Tensor, angles: Sequence[float], interpolation: str = "bilinear",
                   batch_size: int = 32) -> Tensor:
    """Logits ``[A, N, classes]`` of raw images ``[N, 1, H, W]`` rotated by each angle (multiples of 90: exact)."""
    return torch.stack([view.logits(rotate(images, float(a), interpolation), batch_size) for a in angles])


def invariance_vs_angle(views: Mapping[str, ModelView], images: Tensor, angles: Sequence[float],
                        interpolation: str = "bilinear",
                        progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Tensor]]:
    """For every model: ``error[a]`` = relative logit change ``max|f(R_a x) - f(x)| / max|f(x)|`` over the batch
    (as :func:`gevit_lib.equivariance.rotation_sweep`) and ``prob_change[a]`` = the largest change of any class
    probability, for raw images ``[N, 1, H, W]`` rotated counter-clockwise by each angle."""
    results = {}
    for name, view in views.items():
        if progress:
            progress(name)
        ref = view.logits(images)
        rot = rotated_logits(view, images, angles, interpolation)
        err = torch.tensor([relative_error(r, ref) for r in rot], dtype=torch.float64)
        dp = (torch.softmax(rot, -1) - torch.softmax(ref, -1)[None]).abs().flatten(1).amax(-1)
        results[name] = {"error": err, "prob_change": dp}
    return results


def plot_invariance_vs_angle(angles: Sequence[float], results: Mapping[str, Mapping[str, Tensor]],
                             title: str = "Invariance under rotation") -> Figure:
    """Two panels against the rotation angle, log scale: the relative logit change and the largest change of a
    class probability. Dotted lines mark the multiples of 90 degrees (exact pixel permutations); exact zeros
    (e.g. the reference angle 0) cannot be drawn on a log scale and are left out."""
    fig = new_figure(SWEEP_SIZE, _STEER_DPI)
    axes = [fig.add_axes((0.06, 0.12, 0.33, 0.76)), fig.add_axes((0.46, 0.12, 0.33, 0.76))]
    a = np.asarray(angles, dtype=float)
    order = np.argsort(a)
    for ax, key, ylabel in zip(axes, ("error", "prob_change"),
                               ("max |Δ logit| / max |logit|", "max |Δ class probability|")):
        lowest = np.inf
        for i, (name, r) in enumerate(results.items()):
            e = r[key].numpy()[order].astype(float)
            e[e <= 0] = np.nan
            if np.isfinite(e).any():
                lowest = min(lowest, float(np.nanmin(e)))
            ax.plot(a[order], e, marker="o", markersize=3, color=f"C{i % 10}", linestyle=("-", "--")[i // 10 % 2],
                    label=name)
        for q in (90, 180, 270):
            ax.axvline(q, color="0.6", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        if np.isfinite(lowest):
            ax.set_ylim(bottom=lowest / 3)
        ax.set_xlim(0, 360)
        ax.set_xticks(range(0, 361, 90))
        ax.set_xlabel("rotation angle (degrees, counter-clockwise)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title)
    return fig


def checkpoints_of(views: Mapping[str, ModelView]) -> str:
    """The distinct checkpoints behind ``views`` (wrappers and table variants folded into their weights)."""
    names = [v.checkpoint.split(" + ")[0].split(" (group_index")[0] for v in views.values()]
    return ", ".join(dict.fromkeys(names))


def invariance_rows(angles: Sequence[float], results: Mapping[str, Mapping[str, Tensor]],
                    views: Mapping[str, ModelView]) -> list[dict[str, Any]]:
    """One row per model: the relative logit change at the multiples of 90 degrees (max over 90/180/270 in the
    sweep), at the other angles (mean and max), and the largest class-probability change anywhere."""
    a = torch.tensor([float(x) % 360.0 for x in angles], dtype=torch.float64)
    exact = (a % 90 == 0) & (a != 0)
    other = a % 90 != 0

    def stat(values: Tensor, mask: Tensor, fn: Callable[[Tensor], Tensor]) -> float | None:
        return float(fn(values[mask])) if bool(mask.any()) else None

    rows = []
    for name, r in results.items():
        e, dp = r["error"], r["prob_change"]
        rows.append({"model": name, "checkpoint": views[name].checkpoint if name in views else "",
                     "error_rot90_multiples_max": stat(e, exact, torch.max),
                     "error_other_angles_mean": stat(e, other, torch.mean),
                     "error_other_angles_max": stat(e, other, torch.max),
                     "max_probability_change": float(dp.max()),
                     "angles": len(a)})
    return rows


def save_invariance_table(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *,
                          meta: Mapping[str, Any]) -> tuple[Path, Path]:
    """The sweep summary as CSV + markdown with its sidecar (numbers in scientific notation)."""
    meta = _check_meta(meta)
    formatted = [{k: (f"{v:.3e}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows]
    return save_table(formatted, path, title="Invariance error against rotation angle", **meta)
