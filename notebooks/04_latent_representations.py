# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. Inside the network: latent representations of transformed digits
#
# Equivariance is a statement about *every* layer: transform the input, and each layer's features transform along
# in a predictable way (for GE-ViT: the feature maps rotate or mirror, and the group axis is permuted), until the
# last layer pools over space and the group axis and the prediction no longer changes at all.
#
# The post's Fig. 7 (`GEVIT_latent_representations_{1,2}.gif`) shows this for the published p4m model (rotations
# by 90 degrees and mirrors): one test digit in six versions, original, rotated by 90, 45 and 20 degrees, mirrored
# and shifted by 3 pixels, and for each the feature maps of all seven layers (two channels c_0, c_1 of two group
# elements g_0, g_1). GIF `_1` is the first "3" of the rotated-MNIST test split filtered to 3s and 8s, `_2` the
# first "8".
#
# **A catch the post missed.** The published p4m checkpoint was trained with GE-ViT's group-axis index table for
# dihedral groups, and that table does *not* make p4m equivariant (the lifting layer is, the group
# layers are not). This notebook therefore draws every GIF twice:
#
# - `GEVIT_latent_representations_{1,2}.gif`: the published model as the post used it (`group_index="reference"`).
# - `GEVIT_latent_representations_{1,2}_corrected.gif`: the same weights with an exactly equivariant table derived
#   from the group's Cayley table (`group_index="corrected"`). Nobody trained this model: its accuracy may differ from
#   the published one (the weights were fitted to the other table), but it is exactly invariant to the 8 symmetries of
#   p4m, which the published one is not.
#
# The caption of each frame gives the prediction and the two logits; under the exact transforms (rotation by 90
# degrees, mirror) the corrected model's logits agree to float32 rounding, the published model's do not. The 45 and
# 20 degree rotations are not symmetries of the pixel grid (interpolation), and the shift moves content across the
# border of a 28 x 28 image: neither model is exactly invariant to those.

# %% tags=["parameters"]
profile = "quick"  # "smoke" (seconds) | "quick" (2-core CPU, minutes) | "full" (the post's settings)
device = "cpu"
data_dir = None  # default: $GEVIT_DATA_DIR, then ./data
out_dir = "../figures"
run_dir = "../runs/04_latent_representations"
seed = 0
interactive = True  # the knobs at the end (ipywidgets); batch runs (papermill) pass False

# %%
from pathlib import Path

import numpy as np
import torch
from IPython.display import Image, Markdown, display

from gevit_lib.equivariance import EXACT_TRANSFORMS, relative_error
from gevit_lib.groups import rotate, translate
from gevit_lib.models.gevit import build_gevit
from gevit_lib.notebook import load_digits, normalize, published_model
from gevit_lib.profiles import figure_profile
from gevit_lib.train import seed_everything
from gevit_lib.viz import figure_to_array, knobs, markdown_table, new_figure, save_gif

seed_everything(seed)
out_dir = Path(out_dir)
settings = figure_profile(profile)
published, checkpoint = published_model("gevit_p4msa_patch5_rotmnist", profile)  # group_index="reference"
# The same weights with the exactly equivariant table: the table is derived from the group, not a learned weight.
corrected = build_gevit("rotmnist", "p4m", patch_size=5, num_classes=2, group_index="corrected")
corrected.load_state_dict(published.state_dict())
models = {"reference": (published.to(device).eval(), f"{checkpoint} (group_index='reference')"),
          "corrected": (corrected.to(device).eval(), f"{checkpoint} (group_index='corrected')")}
digits = load_digits("test", profile, data_dir, labels=(3, 8))  # the first 3 and the first 8
print(f"data: {digits.data_source}, {digits.split} split, indices {digits.indices} (digits 3 and 8)")
for table, (_, label) in models.items():
    print(f"{table}: {label}")
print(f"frames: {list(settings.latent_transforms)}; exact transforms measured: {list(settings.exact_transforms)}")

# %% [markdown]
# ## The transformed digits
# The frames of the GIFs: the original, rotations by 90 degrees (exact: a pixel permutation), 45 and 20 degrees
# (nearest neighbour, as PIL's default), a mirror (left-right) and a shift of the content 3 pixels up and left. The
# exact transforms whose invariance error we measure (rot90, rot180, rot270, flip) are added to the same batch when
# they are not already frames.

# %%
def transform(image: torch.Tensor, name: str) -> torch.Tensor:
    """A frame of the latent GIFs, or an exact transform, of a raw image [1, H, W]."""
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
    raise ValueError(f"unknown transform {name!r}")


ALSO_FRAMES = {"rot90": "rotate 90", "flip": "mirror"}  # exact transforms that are also frames: computed once


def name_in_batch(exact: str) -> str:
    """Where an exact transform sits in the batch: as its frame when it is one, else under its own name."""
    return ALSO_FRAMES[exact] if ALSO_FRAMES.get(exact) in settings.latent_transforms else exact


names = list(settings.latent_transforms) + [n for n in ("original", *settings.exact_transforms)
                                             if name_in_batch(n) not in settings.latent_transforms]
print(f"batch: {names}")

# %% [markdown]
# ## The GIFs
# Rows: (group element, channel) = (g_0, c_0), (g_0, c_1), (g_1, c_0), (g_1, c_1); columns: the input and the
# outputs of the seven layers (two transformer layers at 24 x 24, max-pooling to 12 x 12, three more layers down to
# 4 x 4, and the classifier's per-class maps). Each panel has its own colour scale. Compare the "rotate 90" frame
# with the original one: its g_1 rows are the original's g_0 rows turned by 90 degrees (rotating the input permutes
# the group axis: element g_1 of the rotated digit sees what g_0 saw). In the corrected GIFs this holds in every
# layer up to float rounding; in the published model's only approximately (from the first group layer on).

# %%
ROWS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (group element, channel)
CLASSES = ("3", "8")


def render_frame(image: torch.Tensor, features: list[torch.Tensor], caption: str) -> np.ndarray:
    """One 720 x 432 frame: per row (g, c) the raw input [1, H, W] and features[layer][c, g] of every layer."""
    fig = new_figure((720, 432), dpi=72)
    axes = fig.subplots(len(ROWS), 1 + len(features), squeeze=False, gridspec_kw=dict(
        left=0.01, right=0.99, top=0.86, bottom=0.01, wspace=0.1, hspace=0.3))
    for r, (g, c) in enumerate(ROWS):
        axes[r, 0].imshow(image.squeeze().cpu().numpy(), cmap="gray")
        axes[r, 0].set_title(f"$g_{{{g}}}, c_{{{c}}}$", fontsize=10)
        for layer, feat in enumerate(features):
            axes[r, 1 + layer].imshow(feat[c, g].cpu().float().numpy(), cmap="viridis")
            if r == 0:
                axes[r, 1 + layer].set_title(f"layer {layer}", fontsize=10)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(caption, fontsize=10)
    return figure_to_array(fig, dpi=72)


results, latents = {}, {}  # latents: every layer's output, kept for the knobs at the end
for number, (image, digit) in enumerate(zip(digits.images, digits.labels), start=1):
    inputs = torch.stack([transform(image, n) for n in names])  # [F, 1, 28, 28]
    for table, (model, label) in models.items():
        with torch.no_grad():  # the output of every layer: lifting, then each module of model.blocks
            out, features = model.lifted(normalize(inputs).to(device)), []
            for layer in model.blocks:
                out = layer(out)
                features.append(out.cpu())  # [F, C, G, H, W]
        logits = model.pool(features[-1]).double()  # sum over the pixels, max over the group axis: [F, 2]
        original = logits[names.index("original")]
        invariance = {e: relative_error(logits[names.index(name_in_batch(e))], original)
                      for e in settings.exact_transforms}
        frame_logits = logits[:len(settings.latent_transforms)]
        frames = []
        for i, (name, z, p) in enumerate(zip(settings.latent_transforms, frame_logits, frame_logits.softmax(-1))):
            values = ", ".join(f"{float(v):.3f}" for v in z)
            caption = f"{name}: predicted {CLASSES[int(p.argmax())]} (p = {float(p.max()):.5f}), logits ({values})"
            frames.append(render_frame(inputs[i], [f[i] for f in features], caption))
        suffix = "" if table == "reference" else "_corrected"
        path = save_gif(frames, out_dir / f"GEVIT_latent_representations_{number}{suffix}.gif", duration_ms=2000,
                        transforms=list(settings.latent_transforms),
                        logits=[[round(float(v), 6) for v in z] for z in frame_logits], class_names=list(CLASSES),
                        invariance_error=invariance, data_source=digits.data_source, checkpoint=label,
                        profile=profile, seed=seed,
                        inputs={"split": digits.split, "index": digits.indices[number - 1], "label": int(digit)})
        results[(number, table)] = (frame_logits, invariance)
        latents[(number, table)] = (inputs, features)
        print(f"digit {int(digit)}, {table} table -> {path}")
        display(Image(filename=str(path)))

# %% [markdown]
# ## Predictions per frame
# Class probabilities and logits of both models for every frame. The published model's numbers move under the
# exact transforms; the corrected model's stay put.

# %%
for (number, table), (frame_logits, _) in results.items():
    rows = [{"frame": name, "predicted": CLASSES[int(p.argmax())], "probability": float(p.max()),
             **{f"logit({c})": float(v) for c, v in zip(CLASSES, z)}, **{f"p({c})": float(v) for c, v in zip(CLASSES, p)}}
            for name, z, p in zip(settings.latent_transforms, frame_logits, frame_logits.softmax(-1))]
    display(Markdown(f"**digit {int(digits.labels[number - 1])}, {table} table**\n\n"
                     + markdown_table(rows, floatfmt=".5f")))

# %% [markdown]
# ## Measured invariance under the exact symmetries
# Relative logit change `max |logit(T x) - logit(x)| / max |logit(x)|` for rotations by 90, 180, 270 degrees and the
# mirror (pixel permutations: an invariant model changes only by float32 rounding, about 1e-7).

# %%
rows = [{"digit": int(digits.labels[number - 1]), "table": table, **invariance}
        for (number, table), (_, invariance) in results.items()]
display(Markdown(markdown_table(rows, floatfmt=".1e")))

# %% [markdown]
# ## Turn it yourself
# Pick a digit, a transformation, a layer and a channel: the feature maps of every group element, the published
# model (top) above the corrected one (bottom), with each model's prediction. Compare "rot90" (or "rotate 90") with
# "original": in the corrected model the row is the original's row shifted by one group element and each map
# turned, in every layer up to float rounding; in the published model only approximately. Every layer's output was
# kept above; a knob only picks what to draw. A batch run (papermill, `interactive=False`) draws the first digit
# turned by 90 degrees at layer 2, channel 0.

# %%
from PIL import Image as PILImage


def draw(digit: int = 1, transformation: str = names[1], layer: int = 2, channel: int = 0) -> None:
    i = names.index(transformation)
    fig = new_figure((760, 220), dpi=72)
    grid = fig.subplots(2, 1 + len(published.group), gridspec_kw=dict(left=0.01, right=0.99, top=0.86, bottom=0.01,
                                                                      wspace=0.1, hspace=0.35))
    for axes, (table, (model, _)) in zip(grid, models.items()):
        inputs, features = latents[(digit, table)]
        feat = features[layer][i, channel]  # [G, h, w]
        p = model.pool(features[-1][i:i + 1]).double().softmax(-1)[0]
        axes[0].imshow(inputs[i].squeeze().numpy(), cmap="gray")
        axes[0].set_title(f"{table}: {CLASSES[int(p.argmax())]} ({float(p.max()):.3f})", fontsize=9, loc="left")
        for g, ax in enumerate(axes[1:]):
            ax.imshow(feat[g].float().numpy(), cmap="viridis")
            ax.set_title(f"$g_{{{g}}}$", fontsize=9)
        for ax in axes:
            ax.axis("off")
    fig.suptitle(f"digit {int(digits.labels[digit - 1])}, {transformation}, layer {layer}, channel {channel}",
                 fontsize=10)
    display(PILImage.fromarray(figure_to_array(fig, dpi=72)))


knob = knobs(draw, interactive, digit=[(f"{int(d)}", n) for n, d in enumerate(digits.labels, start=1)],
             transformation=names, layer=(0, len(features) - 1),
             channel=(0, min(f.shape[1] for f in features) - 1))
