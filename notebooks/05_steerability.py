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
# # 5. How far does the symmetry reach? Steerability and other angles
#
# GE-ViT's positional encoding is an MLP of a *continuous* offset, so any rotation angle can be plugged in: a p8
# model rotates its encoding by multiples of 45 degrees. The GE-ViT paper calls this steerability. The post's
# Fig. 8 (`not_steerable.png`) shows its limit: an untrained p8 model (random weights, one block of two layers, two
# classes, as in the post) classifies a test digit rotated by k x 45 degrees. The logits are identical for the four
# multiples of 90 degrees, where rotating the image just permutes pixels, and different for the odd multiples of 45
# degrees, where the rotated image has to be interpolated onto the pixel grid. The model is equivariant to the
# rotations the *grid* has, not to the ones its encoding can express.
#
# The second figure measures the same question for every model of the post, over the whole circle: the relative
# logit change `max |logit(R_a x) - logit(x)| / max |logit(x)|` (left) and the largest change of a class
# probability (right) when test digits are rotated by angle a (bilinear interpolation, black corners):
#
# - GE-ViT p4 (published) and p8 (untrained, as in Fig. 8): exact at multiples of 90 degrees, approximate between.
# - GE-ViT p4m, published: **not** exact even at 90 degrees (its group-axis table is not equivariant, notebook 4);
#   with the corrected table (same weights): exact at 90 degrees.
# - The plain ViT trained on rotated MNIST: no exact symmetry; it has only *learned* to cope with rotations.
# - Post-hoc mean pooling over the ViT's outputs for 4 rotations (C4), 4 rotations and mirrors (D4), and 16
#   rotations (C16): exact for C4 and D4 at multiples of 90 degrees. The original's C16 stack rotates each copy
#   with nearest-neighbour interpolation on its own sampling grid, so it is not exact even at 90 degrees.
#
# Relative logit changes are comparable within a model across angles; across models, the probability panel says
# what a change means for the prediction (a confident model can move its logits a lot without changing its answer).

# %% tags=["parameters"]
profile = "quick"  # "smoke" (seconds) | "quick" (2-core CPU, minutes) | "full" (the post's settings)
device = "cpu"
data_dir = None  # default: $GEVIT_DATA_DIR, then ./data
out_dir = "../figures"
run_dir = "../runs/05_steerability"
seed = 0
interactive = True  # the knob at the end (ipywidgets); batch runs (papermill) pass False

# %%
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from IPython.display import Image, Markdown, display

from gevit_lib.equivariance import relative_error
from gevit_lib.groups import rotate
from gevit_lib.models.gevit import build_gevit
from gevit_lib.notebook import load_digits, normalize, predict, published_model
from gevit_lib.posthoc import PostHoc
from gevit_lib.profiles import figure_profile
from gevit_lib.train import seed_everything
from gevit_lib.viz import figure_to_array, knobs, new_figure, save_figure, save_table, write_sidecar

seed_everything(seed)
out_dir = Path(out_dir)
settings = figure_profile(profile)

# %% [markdown]
# ## Fig. 8: an untrained p8 GE-ViT under 45-degree rotations
# The first test digit of the 3-and-8 subset, not normalised (as in the post), rotated by 0, 45, ..., 315 degrees
# (bilinear interpolation for the odd multiples of 45).

# %%
torch.manual_seed(seed)  # the post's model: random weights, one block of two layers (crops 2, 0), two classes
p8 = build_gevit("rotmnist", "p8", num_classes=2, block_sizes=(2,), crop_per_layer=(2, 0)).eval().to(device)
p8_label = f"untrained p8 GE-ViT (seed {seed})"
digit = load_digits("test", profile, data_dir, n=1)
angles_45 = [k * 45.0 for k in range(8)]
inputs = torch.stack([rotate(digit.images[0], a, "bilinear") for a in angles_45])  # [8, 1, 28, 28]
logits = predict(p8, inputs).double()  # [8, 2]
step_90 = (logits[0::2] - logits[0]).abs().max().item()
step_45 = (logits[1::2] - logits[0]).abs().max().item()
print(f"largest logit change at multiples of 90 degrees: {step_90:.2e}; at odd multiples of 45: {step_45:.2e}")

fig = new_figure((1200, 600), dpi=100)
axes = fig.subplots(2, 4, gridspec_kw=dict(left=0.01, right=0.99, top=0.93, bottom=0.01, wspace=0.05, hspace=0.12))
for ax, angle, image, z in zip(axes.ravel(), angles_45, inputs, logits):
    ax.axis("off")
    ax.imshow(image.squeeze().numpy(), cmap="gray")
    ax.set_title(f"{angle:g}°  Logits: ({', '.join(f'{float(v):.2f}' for v in z)})", fontsize=11)
path = save_figure(fig, out_dir / "not_steerable.png", dpi=100, data_source=digit.data_source, checkpoint=p8_label,
                   profile=profile, seed=seed, inputs=digit.describe(),
                   logits=[[round(float(v), 4) for v in row] for row in logits],
                   max_logit_change_at_90_multiples=step_90, max_logit_change_at_odd_45_multiples=step_45)
display(Image(filename=str(path)))

# %% [markdown]
# ## Invariance error against the rotation angle
# The models of the post, each with the input it expects (normalised digits; the untrained p8 raw, as above): the
# published p4m checkpoint twice, with the table it was trained with and with the corrected table (the same weights,
# notebook 4), and the ViT wrapped by `PostHoc(vit, "mean", group)`, which averages its logits over the group's
# transformed copies of the input.

# %%
p4, p4_checkpoint = published_model("gevit_p4sa_patch5_rotmnist", profile)
p4m, p4m_checkpoint = published_model("gevit_p4msa_patch5_rotmnist", profile)  # the table it was trained with
p4m_corrected = build_gevit("rotmnist", "p4m", patch_size=5, num_classes=2, group_index="corrected").eval()
p4m_corrected.load_state_dict(p4m.state_dict())
vit, vit_checkpoint = published_model("vit_rotmnist", profile)
vit = vit.to(device).eval()
models = {  # name -> (model, its checkpoint, normalise the input?)
    "GE-ViT p4 (published)": (p4, p4_checkpoint, True),
    "GE-ViT p8 (untrained, raw input)": (p8, p8_label, False),
    "GE-ViT p4m (published table)": (p4m, f"{p4m_checkpoint} (group_index='reference')", True),
    "GE-ViT p4m (corrected table)": (p4m_corrected, f"{p4m_checkpoint} (group_index='corrected')", True),
    "ViT": (vit, vit_checkpoint, True),
}
for group in ("C4", "D4", "C16"):  # the original's stacks: nearest interpolation, 0-filled corners
    models[f"ViT + post-hoc mean {group}"] = (PostHoc(vit, "mean", group).eval(), f"{vit_checkpoint} + mean {group}", True)
checkpoints = ", ".join([p4_checkpoint, p8_label, p4m_checkpoint, vit_checkpoint])

# %% [markdown]
# The sweep: every model sees the digits rotated counter-clockwise by each angle (multiples of 90 degrees exactly,
# the others bilinear with black corners) and we record the relative logit change and the largest change of any
# class probability. This is the expensive cell: the p4m and p8 models attend over 8 group elements in every layer.

# %%
digits = load_digits("test", profile, data_dir, n=settings.sweep_digits, labels=(3, 8))
angles = settings.sweep_angles
print(f"data: {digits.data_source}, {digits.split} split, indices {digits.indices}; "
      f"{len(angles)} angles from {min(angles):g} to {max(angles):g} degrees")
results, start = {}, time.time()
for name, (model, _, normalise) in models.items():
    print(f"  {time.time() - start:5.0f} s  {name}")
    model.to(device)
    prepare = normalize if normalise else (lambda raw: raw)
    reference = predict(model, prepare(digits.images)).double()  # [N, classes]
    rotated = torch.stack([predict(model, prepare(rotate(digits.images, float(a), "bilinear"))).double()
                           for a in angles])  # [A, N, classes]
    error = torch.tensor([relative_error(r, reference) for r in rotated], dtype=torch.float64)  # [A]
    prob_change = (rotated.softmax(-1) - reference.softmax(-1)[None]).abs().flatten(1).amax(-1)  # [A]
    results[name] = {"error": error, "prob_change": prob_change}

# %% [markdown]
# Two panels against the rotation angle, log scale. Dotted lines mark the multiples of 90 degrees (exact pixel
# permutations); exact zeros (e.g. the reference angle 0) cannot be drawn on a log scale and are left out.

# %%
fig = new_figure((1200, 500), dpi=100)
axes = [fig.add_axes((0.06, 0.12, 0.33, 0.76)), fig.add_axes((0.46, 0.12, 0.33, 0.76))]
a = np.asarray(angles, dtype=float)
order = np.argsort(a)
for ax, key, ylabel in zip(axes, ("error", "prob_change"), ("max |Δ logit| / max |logit|", "max |Δ class probability|")):
    lowest = np.inf
    for i, (name, r) in enumerate(results.items()):
        e = r[key].numpy()[order].astype(float)
        e[e <= 0] = np.nan
        if np.isfinite(e).any():
            lowest = min(lowest, float(np.nanmin(e)))
        ax.plot(a[order], e, marker="o", markersize=3, color=f"C{i % 10}", linestyle=("-", "--")[i // 10 % 2], label=name)
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
fig.suptitle("Invariance under rotation")
meta = dict(data_source=digits.data_source, checkpoint=checkpoints, profile=profile, seed=seed, inputs=digits.describe())
path = save_figure(fig, out_dir / "invariance_vs_angle.png", dpi=100, **meta, angles=list(angles),
                   models={name: checkpoint for name, (_, checkpoint, _) in models.items()})
display(Image(filename=str(path)))

# %% [markdown]
# ## The numbers
# Per model: the largest relative logit change at the multiples of 90 degrees in the sweep, the mean and largest at
# the other angles, and the largest change of any class probability. Written to `invariance_vs_angle.csv` (and
# `.md`) with the provenance.

# %%
turn = torch.tensor([float(x) % 360.0 for x in angles], dtype=torch.float64)
exact, other = (turn % 90 == 0) & (turn != 0), turn % 90 != 0  # quarter turns; angles that need interpolation


def stat(values: torch.Tensor, mask: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    return f"{float(fn(values[mask])):.3e}" if bool(mask.any()) else None


rows = [{"model": name, "checkpoint": models[name][1],
         "error_rot90_multiples_max": stat(r["error"], exact, torch.max),
         "error_other_angles_mean": stat(r["error"], other, torch.mean),
         "error_other_angles_max": stat(r["error"], other, torch.max),
         "max_probability_change": f"{float(r['prob_change'].max()):.3e}", "angles": len(turn)}
        for name, r in results.items()]
csv_path, md_path = save_table(rows, out_dir / "invariance_vs_angle.csv", title="Invariance error against rotation angle",
                               **meta)
# the figure and the table share their name, so one sidecar (written last) describes both
write_sidecar(path, [path, csv_path, md_path], rows=len(rows), angles=list(angles),
              models={name: checkpoint for name, (_, checkpoint, _) in models.items()}, **meta)
display(Markdown(md_path.read_text()))

# %% [markdown]
# ## Turn it yourself
# Pick an angle of the sweep: the first digit turned by it, and every model's relative logit change and largest
# class-probability change at that angle (computed above; the knob only picks a column of the sweep). A batch run
# (papermill, `interactive=False`) draws the angle of the sweep nearest to 45 degrees.

# %%
from PIL import Image as PILImage

step = angles[1] - angles[0] if len(angles) > 1 else 1.0  # the profiles' sweeps are evenly spaced


def draw(angle: float = min(angles, key=lambda v: abs(v - 45.0))) -> None:
    i = int(np.argmin([abs(float(v) - angle) for v in angles]))
    fig = new_figure((900, 300), dpi=72)
    grid = fig.add_gridspec(1, 3, width_ratios=(2, 2, 1), left=0.22, right=0.99, top=0.86, bottom=0.14, wspace=0.15)
    ax = fig.add_subplot(grid[2])
    ax.imshow(rotate(digits.images[0], float(angles[i]), "bilinear").squeeze().numpy(), cmap="gray")
    ax.axis("off")
    for k, (key, label) in enumerate((("error", "max |Δ logit| / max |logit|"), ("prob_change", "max |Δ probability|"))):
        ax = fig.add_subplot(grid[k])
        values = [max(float(r[key][i]), 1e-17) for r in results.values()]  # an exact 0 drawn at the floor
        ax.barh(range(len(values)), values, color=[f"C{j % 10}" for j in range(len(values))], log=True)
        ax.set_yticks(range(len(values)), list(results) if k == 0 else [], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(1e-17, 10)
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"rotated by {float(angles[i]):g} degrees")
    display(PILImage.fromarray(figure_to_array(fig, dpi=72)))


knob = knobs(draw, interactive, angle=(float(min(angles)), float(max(angles)), float(step)))
