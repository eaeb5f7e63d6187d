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
# # 2. Where the symmetry lives: GE-ViT's relative positional encoding
#
# Self-attention by itself does not care where things are: permute the pixels and the output is permuted the same
# way. What makes a vision transformer see *shapes* is the positional encoding, and it is also what usually breaks
# rotation symmetry: "one pixel to the right" is not the same thing after the image is turned.
#
# GE-ViT (like GSA-Nets before it) attends from every pixel to its P x P neighbourhood (here P = 5) and encodes
# the *relative* offset of each neighbour with two small MLPs, one for the row offset and one for the column offset.
# The trick: the model computes the attention once **for every group element g**, and for element g it feeds the
# MLPs the offsets *transformed by g* (rotated, and for p4m also mirrored). Rotating the image then only permutes
# which copy sees what, so the features rotate along with the input instead of changing.
#
# This notebook draws the post's Figs. 3-5 from the published p4m checkpoint (`gevit_p4msa_patch5_rotmnist`, 8
# group elements: 4 rotations, then the same 4 mirrored), and then shows the "minor mathematical error" of
# GSA-Nets that GE-ViT fixed, with a measured invariance error.

# %% tags=["parameters"]
profile = "quick"  # "smoke" (seconds) | "quick" (2-core CPU, minutes) | "full" (the post's settings)
device = "cpu"
data_dir = None  # default: $GEVIT_DATA_DIR, then ./data
out_dir = "../figures"
run_dir = "../runs/02_positional_encoding"
seed = 0
interactive = True  # the knobs at the end (ipywidgets); batch runs (papermill) pass False

# %%
from pathlib import Path

import numpy as np
import torch
from IPython.display import Image, Markdown, display

from gevit_lib.equivariance import exact_invariance
from gevit_lib.groups import get_group
from gevit_lib.models.gevit import build_gevit
from gevit_lib.nn.positional import group_index_table, relative_coordinates
from gevit_lib.notebook import load_digits, normalize, published_model
from gevit_lib.train import seed_everything
from gevit_lib.viz import figure_to_array, knobs, markdown_table, new_figure, plot_group_panels, save_figure, save_table

seed_everything(seed)
out_dir = Path(out_dir)
model, checkpoint = published_model("gevit_p4msa_patch5_rotmnist", profile)
model = model.to(device)
meta = dict(data_source="none (model parameters only)", checkpoint=checkpoint, profile=profile, seed=seed)
print(f"checkpoint: {checkpoint}")

# %% [markdown]
# ## Fig. 3: the transformed offset grids
# For each group element g_i, the 5 x 5 grid of (normalised) row offsets, from -1 (two pixels up) to +1 (two
# pixels down), *after* g_i acts on it: this is what the row-embedding MLP of the lifting layer is fed. g_0 is the
# identity (rows increase downwards); g_1 is a rotation by 90 degrees, so the "row" offset now runs along the
# columns; g_2 turns it upside down; g_4 to g_7 are the mirrored elements: a mirror about the vertical axis leaves
# row offsets alone (g_4 equals g_0) and reverses column offsets (compare the two figures).
#
# The grids are a buffer of the lifting layer's positional encoding (`pos.coords`), computed once by
# `relative_coordinates(group, patch_size)`: the offset vector of every neighbour, transformed by each group element.

# %%
lifting = model.attention_layers()[0]  # the lifting self-attention layer
grids = lifting.pos.coords.detach().double().cpu()  # [G, P, P, 2]: transformed row offsets, column offsets
print("same as relative_coordinates:", torch.allclose(grids, relative_coordinates(model.group, 5).double(), atol=1e-6))
for channel, name, title in ((0, "row_embd_idxs.png", "Row embedding indices"),
                             (1, "col_embd_idxs.png", "Column embedding indices")):
    fig = plot_group_panels(grids[..., channel], title, (792, 360), vmin=-1, vmax=1, colorbar=True)
    path = save_figure(fig, out_dir / name, dpi=72, **meta)
    display(Image(filename=str(path)))

# %% [markdown]
# ## Fig. 4: what the embedding makes of it
# The first group self-attention layer's row MLP applied to its own transformed row offsets: channel 0 of the
# resulting embedding for each group element. The trained MLP has learned a pattern (here a band at one offset);
# the group elements see the same pattern rotated or mirrored, which is the whole point.

# %%
pos = model.attention_layers()[1].pos  # positional encoding of the first group self-attention layer
with torch.no_grad():
    row = pos.row(pos.coords[..., 0]).cpu()  # [G, P, P, channels]: row MLP of each transformed row offset
    col = pos.col(pos.coords[..., 1]).cpu()  # the same for the column offsets
fig = plot_group_panels(row[..., 0], "Channel 0 of transformed row embedding", (936, 576))
path = save_figure(fig, out_dir / "row_embd_final.png", dpi=72, **meta)
display(Image(filename=str(path)))

# %% [markdown]
# ## Fig. 5: row + column = a 2-D positional pattern
# The query is matched against the row embedding and the column embedding separately and the two scores add up, so
# the effective positional preference over the neighbourhood is their sum (group element g_0, channel 0).

# %%
fig = new_figure((720, 288), dpi=72)
r, c = row[0, ..., 0], col[0, ..., 0]
for ax, data, name in zip(fig.subplots(1, 3), (r, c, r + c), ("Row embedding", "Column embedding", "Combined")):
    ax.imshow(data.numpy(), cmap="viridis")
    ax.set_title(name)
    ax.axis("off")
path = save_figure(fig, out_dir / "combined_embd.png", dpi=72, **meta)
display(Image(filename=str(path)))

# %% [markdown]
# ## GSA-Nets' "minor mathematical error"
# GE-ViT is GSA-Nets with a few lines changed. Two things have to agree for the network to be
# invariant: how the **spatial** offsets are transformed for each group element, and how the **group axis** is
# indexed (which learned group embedding the query at element g uses for a key at element m, in the group layers).
#
# - GSA-Nets rotated the (row, column) vector; GE-ViT rotates the (x = column, y = row) vector with the same matrix.
#   The encoding therefore turns the *other way round* (GSA's g_1 is GE-ViT's g_3 below), and GSA mirrors by
#   flipping the array before rotating where GE-ViT mirrors after rotating.
# - For output element v, query element g and key element m, GSA-Nets used group embedding number (m + v - g) mod n,
#   GE-ViT (2g - m - v) mod n.
#
# Neither convention is wrong on its own. What matters is that the two are *consistent*: we build three random p4
# models that differ only in these choices (same seed, float64, the rotMNIST architecture) and measure how much
# their logits change when a real test digit is rotated by exactly 90, 180 and 270 degrees (pixel permutations, no
# interpolation). An invariant model gives float64 rounding noise; anything far above it is a real error.

# %%
# name -> (positional convention, group-index table): the two published codes and the fix that keeps GSA's grid
ENCODINGS = {"GSA-Nets": ("gsa", "reference"), "GE-ViT": ("gevit", "reference"),
             "GSA-Nets grid + consistent group table": ("gsa", "corrected")}
digit = load_digits("test", profile, data_dir, n=1)
x = normalize(digit.images).double()  # [1, 1, 28, 28]
rows = []
for name, (positional, table) in ENCODINGS.items():
    torch.manual_seed(seed)  # the same random weights for every encoding
    random_model = build_gevit("rotmnist", "p4", positional=positional, group_index=table).double().eval()
    errors = exact_invariance(random_model, x)  # rot90 / rot180 / rot270 -> relative logit change
    rows.append({"encoding": name, "positional": positional, "group_index": table, "group": "p4", **errors,
                 "max_rot90": max(errors.values()), "dtype": "float64"})
display(Markdown(markdown_table(rows, ["encoding", "positional", "group_index", "rot90", "rot180", "rot270"],
                                floatfmt=".1e")))
save_table(rows, out_dir / "positional_encoding_invariance.csv", floatfmt=".1e",
           title="Invariance error of random p4 models by positional encoding",
           **{**meta, "data_source": digit.data_source})

# %% [markdown]
# The offset grids of the two conventions side by side, rows and columns of GE-ViT and GSA-Nets for the 8 elements
# of p4m, with the measured errors under the title.

# %%
group = get_group("p4m")
grids = {"gevit": relative_coordinates(group, 5, "gevit"), "gsa": relative_coordinates(group, 5, "gsa")}
fig = new_figure((960, 600), dpi=80)
axes = fig.subplots(4, len(group), squeeze=False,
                    gridspec_kw=dict(left=0.14, right=0.9, top=0.84, bottom=0.02, hspace=0.25))
panels = [("gevit", 0, "GE-ViT\nrow"), ("gsa", 0, "GSA-Nets\nrow"), ("gevit", 1, "GE-ViT\ncolumn"),
          ("gsa", 1, "GSA-Nets\ncolumn")]
for r, (kind, channel, label) in enumerate(panels):
    for g in range(len(group)):
        ax = axes[r, g]
        im = ax.imshow(grids[kind][g, ..., channel].numpy(), cmap="viridis", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_title(f"$g_{{{g}}}$")
        if g == 0:
            ax.set_ylabel(label, rotation=0, ha="right", va="center")
fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02)
fig.suptitle(f"Transformed offset grids of {group.name}: GE-ViT vs GSA-Nets (patch 5)")
note = "rot90/180/270 invariance error (random p4 models, float64): " + "; ".join(
    f"{r['encoding']}: {r['max_rot90']:.1e}" for r in rows)
fig.text(0.5, 0.905, note, ha="center", va="center", fontsize=9)
path = save_figure(fig, out_dir / "gsa_vs_gevit_embd_idxs.png", dpi=80, **{**meta, "data_source": digit.data_source},
                   invariance_error={r["encoding"]: {k: r[k] for k in ("rot90", "rot180", "rot270")} for r in rows},
                   measured_on=digit.describe())
display(Image(filename=str(path)))

# %% [markdown]
# The first row is GSA-Nets as published, the second GE-ViT as published, the third keeps GSA-Nets' spatial
# convention but indexes the group axis consistently with it (the table this library derives from the group's
# Cayley table). Read the numbers: only the published GSA-Nets pairing is far above float64 rounding. The "minor
# error" was not one wrong formula but a spatial encoding and a group-axis table that disagreed about which way the
# group acts.
#
# The group-axis tables for p4, output element v = 0 (rows: query element g, columns: key element m):

# %%
for name, (positional, table) in ENCODINGS.items():
    print(f"{name} ({positional}, {table}):\n{group_index_table('p4', table, positional)[0].numpy()}\n")

# %% [markdown]
# ## Turn it yourself
# Pick a group element and a grid: the transformed row or column offsets of the lifting layer (GE-ViT's
# convention, Fig. 3, or GSA-Nets'), or channel 0 of the first group layer's row or column embedding (Fig. 4), each
# value written in its cell. Everything is computed above; a knob only picks what to draw. A batch run (papermill,
# `interactive=False`) draws g_1's row offsets.

# %%
from PIL import Image as PILImage

coords = lifting.pos.coords.detach().cpu()  # [G, P, P, 2]
GRIDS = {"row offsets": coords[..., 0], "column offsets": coords[..., 1], "GSA-Nets row offsets": grids["gsa"][..., 0],
         "GSA-Nets column offsets": grids["gsa"][..., 1], "row embedding, channel 0": row[..., 0],
         "column embedding, channel 0": col[..., 0]}


def draw(g: int = 1, grid: str = "row offsets") -> None:
    values = GRIDS[grid][g].double()
    fig = new_figure((360, 380), dpi=72)
    ax = fig.add_axes((0.05, 0.03, 0.9, 0.82))
    ax.imshow(values.numpy(), cmap="viridis")
    for (i, j), v in np.ndenumerate(values.numpy()):
        ax.text(j, i, f"{v:.2f}".replace("-0.00", "0.00"), ha="center", va="center", color="white", fontsize=10)
    ax.axis("off")
    ax.set_title(f"{grid}, $g_{{{g}}}$")
    display(PILImage.fromarray(figure_to_array(fig, dpi=72)))


knob = knobs(draw, interactive, g=(0, len(coords) - 1), grid=list(GRIDS))
