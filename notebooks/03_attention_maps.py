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
# # 3. What a pixel attends to: lifting self-attention maps
#
# GE-ViT's first layer, the **lifting self-attention**, takes the image to a function on the group: for every
# pixel and every group element g it computes an attention distribution over the pixel's 5 x 5 neighbourhood,
# with the positional encoding transformed by g (notebook 2). Several heads do this in parallel, each with its own
# queries, keys and embeddings.
#
# The post's Fig. 6 (`GEVIT_attention.gif`) shows these distributions for the centre pixel (row 14, column 14) of
# five test digits, from the published p4m checkpoint: the digit, the 5 x 5 patch around the centre pixel, and
# the attention weights of heads 0 and 1 for group elements g_0 (identity) and g_1 (rotation by 90 degrees).
# Brighter = more attention; each map sums to 1.
#
# What to look for:
#
# - The maps are sparse and follow the strokes: a head typically picks a few neighbours with particular content.
# - For the same pixel, g_1 does not just rotate g_0's map: the content term (query times key) is the same for
#   every group element, only the positional term turns. So the maps of g_0 and g_1 differ wherever position
#   mattered to the head. Rotating the *image* by 90 degrees, on the other hand, makes g_1 see what g_0 saw (checked
#   at the end).
#
# Recipe (the post's): the first five images of the rotated-MNIST test split filtered to 3s and 8s, normalised; the
# lifting layer has no group-axis table, so the published and the corrected p4m model give the same maps.

# %% tags=["parameters"]
profile = "quick"  # "smoke" (seconds) | "quick" (2-core CPU, minutes) | "full" (the post's settings)
device = "cpu"
data_dir = None  # default: $GEVIT_DATA_DIR, then ./data
out_dir = "../figures"
run_dir = "../runs/03_attention_maps"
seed = 0
interactive = True  # the knobs at the end (ipywidgets); batch runs (papermill) pass False

# %%
from pathlib import Path

import numpy as np
import torch
from IPython.display import Image, display

from gevit_lib.equivariance import rotate_lifting_attention
from gevit_lib.notebook import load_digits, normalize, published_model
from gevit_lib.profiles import figure_profile
from gevit_lib.train import seed_everything
from gevit_lib.viz import figure_to_array, knobs, new_figure, save_gif

seed_everything(seed)
out_dir = Path(out_dir)
settings = figure_profile(profile)
model, checkpoint = published_model("gevit_p4msa_patch5_rotmnist", profile)
model = model.to(device)
digits = load_digits("test", profile, data_dir, n=settings.attention_images)
meta = dict(data_source=digits.data_source, checkpoint=checkpoint, profile=profile, seed=seed,
            inputs=digits.describe())
print(f"checkpoint: {checkpoint}\ndata: {digits.data_source}, {digits.split} split, indices {digits.indices}")

# %% [markdown]
# ## Asking the lifting layer for its attention
# Every attention layer returns its attention probabilities next to its output when called with
# `return_attention=True` (computed by the plain, readable implementation, before dropout). The lifting layer is the
# model's first layer, so (in eval mode, no input dropout) its input is the normalised image itself. For every
# pixel, head and group element it gives a distribution over the 5 x 5 neighbourhood:
# `[images, heads, group elements, H, W, 5, 5]`; we keep the one at the centre pixel.

# %%
x = normalize(digits.images).to(device)  # [N, 1, 28, 28]
with torch.no_grad():
    _, attention = model.lift(x, return_attention=True)  # [N, heads, G, H, W, P, P]
centre = (14, 14)
at_centre = attention[:, :, :, centre[0], centre[1]].cpu()  # [N, heads, G, P, P]
print(f"attention {tuple(attention.shape)}; at the centre pixel {tuple(at_centre.shape)}; "
      f"each map sums to {float(at_centre.sum((-2, -1)).mean()):.4f}")

# %% [markdown]
# ## Fig. 6: the GIF
# One frame per digit: the digit, the 5 x 5 patch around the centre pixel, and the maps of (head, group element)
# = (0, 0), (0, 1), (1, 0), (1, 1).

# %%
PANELS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (head, group element)


def render_frame(image: torch.Tensor, target: str, probs: torch.Tensor) -> np.ndarray:
    """One 576 x 144 frame: the raw digit [1, H, W], the patch around the centre and the maps probs[head, g]."""
    fig = new_figure((576, 144), dpi=72)
    axes = fig.subplots(1, 2 + len(PANELS), gridspec_kw=dict(left=0.01, right=0.99, top=0.8, bottom=0.02,
                                                             wspace=0.15))
    img, p, (i, j) = image.squeeze().cpu(), probs.shape[-1], centre
    axes[0].imshow(img.numpy(), cmap="gray")
    axes[0].set_title(f"Target: {target}", fontsize=10)
    axes[1].imshow(img[i - p // 2:i + p // 2 + 1, j - p // 2:j + p // 2 + 1].numpy(), cmap="gray")
    axes[1].set_title("Center pixel", fontsize=10)
    for ax, (h, g) in zip(axes[2:], PANELS):
        ax.imshow(probs[h, g].cpu().numpy(), cmap="viridis")
        ax.set_title(f"$MHA_{{{h}}}, g_{{{g}}}$", fontsize=10)
    for ax in axes:
        ax.axis("off")
    return figure_to_array(fig, dpi=72)


targets = [str(int(v)) for v in digits.labels]
frames = [render_frame(image, target, maps) for image, target, maps in zip(digits.images, targets, at_centre)]
path = save_gif(frames, out_dir / "GEVIT_attention.gif", duration_ms=2000, centre=list(centre),
                panels=[list(p) for p in PANELS], targets=targets, **meta)
display(Image(filename=str(path)))

# %% [markdown]
# ## Check: rotating the image hands g_0's map to the next group element
# The lifting layer is exactly equivariant: if the image is rotated by 90 degrees counter-clockwise
# (`torch.rot90`), the attention of group element g at a pixel equals the rotated attention of a neighbouring
# group element at the corresponding pixel of the original. `rotate_lifting_attention` writes that rule down: permute
# the group axis by the rotation's regular action, turn the pixel axes and the neighbourhood axes by 90 degrees.
# Below, for every head and group element of the first digit, the largest difference between the attention maps
# of the rotated image and the correspondingly permuted and rotated maps of the original (over all pixels).
# Float32 rounding is about 1e-7.

# %%
with torch.no_grad():
    _, turned = model.lift(torch.rot90(x[:1], 1, dims=(-2, -1)), return_attention=True)
expected = rotate_lifting_attention(attention[:1], model.group, k=1, side=model.feature_side)
error = float((turned - expected).abs().max())
print(f"max |attention(rot90 x) - rot90 attention(x), group axis permuted| = {error:.1e}")

# %% [markdown]
# ## Turn it yourself
# Any digit, head, group element and pixel: the digit with the pixel's 5 x 5 neighbourhood framed, the
# neighbourhood itself, and where the lifting layer looks from that pixel. The maps of every pixel, head and group
# element were computed above (`attention`); a knob only picks one. A batch run (papermill, `interactive=False`)
# draws the first digit, head 0, g_1 at the centre pixel.

# %%
from matplotlib.patches import Rectangle
from PIL import Image as PILImage

maps = attention.cpu()  # [N, heads, G, H, W, P, P]
p = maps.shape[-1]


def draw(digit: int = 0, head: int = 0, g: int = 1, row: int = 14, col: int = 14) -> None:
    fig = new_figure((540, 200), dpi=72)
    axes = fig.subplots(1, 3, gridspec_kw=dict(left=0.01, right=0.99, top=0.82, bottom=0.02, wspace=0.1))
    img = digits.images[digit].squeeze()
    axes[0].imshow(img.numpy(), cmap="gray")
    axes[0].add_patch(Rectangle((col - p // 2 - 0.5, row - p // 2 - 0.5), p, p, fill=False, color="red"))
    axes[0].set_title(f"Target: {targets[digit]}, pixel ({row}, {col})", fontsize=10)
    axes[1].imshow(img[row - p // 2:row + p // 2 + 1, col - p // 2:col + p // 2 + 1].numpy(), cmap="gray")
    axes[1].set_title("its neighbourhood", fontsize=10)
    axes[2].imshow(maps[digit, head, g, row, col].numpy(), cmap="viridis", vmin=0)
    axes[2].set_title(f"$MHA_{{{head}}}, g_{{{g}}}$", fontsize=10)
    for ax in axes:
        ax.axis("off")
    display(PILImage.fromarray(figure_to_array(fig, dpi=72)))


side = maps.shape[3]
knob = knobs(draw, interactive, digit=[(f"{i} (class {t})", i) for i, t in enumerate(targets)],
             head=(0, maps.shape[1] - 1), g=(0, maps.shape[2] - 1), row=(p // 2, side - 1 - p // 2),
             col=(p // 2, side - 1 - p // 2))
