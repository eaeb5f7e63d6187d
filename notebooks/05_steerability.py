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

# %%
import time
from pathlib import Path

from IPython.display import Image, Markdown, display

from gevit_lib.experiments import figures
from gevit_lib.train import seed_everything

seed_everything(seed)
out_dir = Path(out_dir)
settings = figures.figure_profile(profile)

# %% [markdown]
# ## Fig. 8: an untrained p8 GE-ViT under 45-degree rotations
# The first test digit of the 3-and-8 subset, not normalised (as in the post), rotated by 0, 45, ..., 315 degrees.

# %%
p8 = figures.steerability_model(seed).to(device)
digit = figures.test_digits(profile, data_dir, n=1)
fig, logits = figures.steerability_figure(p8, digit.images[0])
step_90 = (logits[0::2] - logits[0]).abs().max().item()
step_45 = (logits[1::2] - logits[0]).abs().max().item()
path = figures.save(fig, out_dir / "not_steerable.png",
                    meta=dict(data_source=digit.data_source, checkpoint=f"untrained p8 GE-ViT (seed {seed})",
                              profile=profile, seed=seed, inputs=digit.describe()),
                    logits=[[round(float(v), 4) for v in row] for row in logits],
                    max_logit_change_at_90_multiples=step_90, max_logit_change_at_odd_45_multiples=step_45)
print(f"largest logit change at multiples of 90 degrees: {step_90:.2e}; at odd multiples of 45: {step_45:.2e}")
display(Image(filename=str(path)))

# %% [markdown]
# ## Invariance error against the rotation angle
# Each model gets the digits in its own input convention (normalised; the untrained p8 raw, as above). This is the
# expensive cell: the p4m and p8 models attend over 8 group elements in every layer.

# %%
views = figures.sweep_views(profile, seed, device)
digits = figures.test_digits(profile, data_dir, n=settings.sweep_digits, labels=(3, 8))
angles = settings.sweep_angles
print(f"data: {digits.data_source}, {digits.split} split, indices {digits.indices}; "
      f"{len(angles)} angles from {min(angles):g} to {max(angles):g} degrees")
start = time.time()
results = figures.invariance_vs_angle(views, digits.images, angles,
                                      progress=lambda name: print(f"  {time.time() - start:5.0f} s  {name}"))
meta = dict(data_source=digits.data_source, checkpoint=figures.checkpoints_of(views), profile=profile, seed=seed,
            inputs=digits.describe())
path = figures.save(figures.plot_invariance_vs_angle(angles, results), out_dir / "invariance_vs_angle.png",
                    meta=meta, angles=list(angles), models={k: v.checkpoint for k, v in views.items()})
display(Image(filename=str(path)))

# %% [markdown]
# ## The numbers
# Per model: the largest relative logit change at the multiples of 90 degrees in the sweep, the mean and largest at
# the other angles, and the largest change of any class probability. Written to `invariance_vs_angle.csv` (and
# `.md`) with the provenance.

# %%
rows = figures.invariance_rows(angles, results, views)
csv_path, md_path = figures.save_invariance_table(rows, out_dir / "invariance_vs_angle.csv", meta=meta)
display(Markdown(md_path.read_text()))
