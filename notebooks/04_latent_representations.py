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
# dihedral groups, and that table does *not* make p4m equivariant (SPEC 2.6: the lifting layer is, the group
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

# %%
from pathlib import Path

from IPython.display import Image, Markdown, display

from gevit_lib.experiments import figures
from gevit_lib.train import seed_everything
from gevit_lib.viz import markdown_table

seed_everything(seed)
out_dir = Path(out_dir)
settings = figures.figure_profile(profile)
models = figures.p4m_tables(profile, device)  # "reference" (published) and "corrected"
digits = figures.test_digits(profile, data_dir, labels=(3, 8))
print(f"data: {digits.data_source}, {digits.split} split, indices {digits.indices} (digits 3 and 8)")
for table, (_, checkpoint) in models.items():
    print(f"{table}: {checkpoint}")
print(f"frames: {list(settings.latent_transforms)}; exact transforms measured: {list(settings.exact_transforms)}")

# %% [markdown]
# ## The GIFs
# Rows: (group element, channel) = (g_0, c_0), (g_0, c_1), (g_1, c_0), (g_1, c_1); columns: the input and the
# outputs of the seven layers (two transformer layers at 24 x 24, max-pooling to 12 x 12, three more layers down to
# 4 x 4, and the classifier's per-class maps). Each panel has its own colour scale. Compare the "rotate 90" frame
# with the original one: its g_1 rows are the original's g_0 rows turned by 90 degrees (rotating the input permutes
# the group axis: element g_1 of the rotated digit sees what g_0 saw). In the corrected GIFs this holds in every
# layer up to float rounding; in the published model's only approximately (from the first group layer on).

# %%
results = {}
for number, (image, digit) in enumerate(zip(digits.images, digits.labels), start=1):
    for table, (model, checkpoint) in models.items():
        suffix = "" if table == "reference" else "_corrected"
        meta = dict(data_source=digits.data_source, checkpoint=checkpoint, profile=profile, seed=seed,
                    inputs={"split": digits.split, "index": digits.indices[number - 1], "label": int(digit)})
        result = figures.latent_animation(model, image, out_dir / f"GEVIT_latent_representations_{number}{suffix}.gif",
                                          meta=meta, transforms=settings.latent_transforms,
                                          exact=settings.exact_transforms, class_names=("3", "8"))
        results[(number, table)] = result
        print(f"digit {int(digit)}, {table} table -> {result.gif}")
        display(Image(filename=str(result.gif)))

# %% [markdown]
# ## Predictions per frame
# Class probabilities and logits of both models for every frame. The published model's numbers move under the
# exact transforms; the corrected model's stay put.

# %%
for (number, table), result in results.items():
    display(Markdown(f"**digit {int(digits.labels[number - 1])}, {table} table**\n\n"
                     + markdown_table(result.rows(), floatfmt=".5f")))

# %% [markdown]
# ## Measured invariance under the exact symmetries
# Relative logit change `max |logit(T x) - logit(x)| / max |logit(x)|` for rotations by 90, 180, 270 degrees and the
# mirror (pixel permutations: an invariant model changes only by float32 rounding, about 1e-7).

# %%
rows = [{"digit": int(digits.labels[number - 1]), "table": table, **result.invariance}
        for (number, table), result in results.items()]
display(Markdown(markdown_table(rows, floatfmt=".1e")))
