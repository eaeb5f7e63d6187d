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
# # 1. Why equivariance? A digit that turns
#
# The post opens (Fig. 1, `Rotation.gif`) with a handwritten "8" turning through a full circle while two
# classifiers watch it:
#
# - **GE-ViT** (p4, the authors' published checkpoint): a vision transformer whose attention layers are built to be
#   *equivariant* to rotations by multiples of 90 degrees. Its prediction cannot change under those rotations, and
#   it was trained on rotated MNIST, so the angles in between are covered by the training data.
# - **Vision Transformer** (the authors' plain ViT trained on *upright* MNIST): it never saw a rotated digit and has
#   nothing in its architecture that knows about rotations.
#
# Watch the bar charts: the ViT is right while the digit is roughly upright (an 8 is also roughly an 8 upside down)
# and wrong in between; the GE-ViT's answer hardly moves. That gap is what building symmetry into a model buys.
#
# **Which input is fair for each model?** Rotated MNIST stores every digit *transposed* (mirrored across the
# diagonal) before rotating it, and the rotated-MNIST models were trained on exactly that. The upright-MNIST ViT was
# trained on digits in MNIST's own orientation. Each model therefore gets the frame in the convention of its own
# training data: the GE-ViT the rotated-MNIST image as stored (the big image), the ViT its transpose, which is the
# original MNIST digit turned the other way round. The small "its input" thumbnails show what each model sees. Feeding
# the ViT the stored image instead would show it mirrored digits, a handicap on top of the rotation.
#
# Recipe (the post's): the first "8" at or after position 18 of the rotated-MNIST training split
# filtered to 3s and 8s (the post took the 19th image of that subset, an 8); rotation about the image centre with
# bilinear interpolation; the corners that appear are filled with the background (black) rather than with 0 of the
# normalised image (grey), so nothing but the rotation changes.

# %% tags=["parameters"]
profile = "quick"  # "smoke" (seconds) | "quick" (2-core CPU, minutes) | "full" (the post's settings)
device = "cpu"
data_dir = None  # default: $GEVIT_DATA_DIR, then ./data
out_dir = "../figures"
run_dir = "../runs/01_why_equivariance"
seed = 0
interactive = True  # the angle slider below (ipywidgets); batch runs (papermill) pass False

# %%
import time
from pathlib import Path

import numpy as np
import torch
from IPython.display import Image, display
from tqdm.auto import tqdm

from gevit_lib.groups import rotate
from gevit_lib.notebook import load_digits, normalize, predict, published_model
from gevit_lib.profiles import figure_profile
from gevit_lib.train import seed_everything
from gevit_lib.viz import figure_to_array, new_figure, save_gif, save_mp4, write_sidecar

seed_everything(seed)
out_dir = Path(out_dir)
settings = figure_profile(profile)
# the first 8 at or after position 18 of the training digits' 3s and 8s (small smoke data: the first 8)
digit = load_digits("train", profile, data_dir, labels=(8,), start=18, fallback_start=0)
image, label = digit.images[0], int(digit.labels[0])  # raw [1, 28, 28], pixels in [0, 1]
gevit, gevit_checkpoint = published_model("gevit_p4sa_patch5_rotmnist", profile)
vit, vit_checkpoint = published_model("vit_mnist", profile)
models = {"GE-ViT": gevit.to(device), "Vision Transformer": vit.to(device)}
# what each model sees of a raw image: the GE-ViT the rotated-MNIST image as stored, the ViT its transpose
views = {"GE-ViT": lambda raw: raw, "Vision Transformer": lambda raw: raw.transpose(-1, -2)}
meta = dict(data_source=digit.data_source, checkpoint=f"{gevit_checkpoint}, {vit_checkpoint}", profile=profile,
            seed=seed, inputs=digit.describe())
print(f"data: {digit.data_source}, {digit.split} split, index {digit.indices[0]}, digit {label}")
print(f"GE-ViT: {gevit_checkpoint} (as stored)\nVision Transformer: {vit_checkpoint} (transposed)")
print(f"frames: {settings.rotation_frames} (every {360 / settings.rotation_frames:g} degrees)")


def probabilities(raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each model's class probabilities [N, classes] for raw images [N, 1, H, W], in its own input convention."""
    return {name: torch.softmax(predict(model, normalize(views[name](raw))).double(), -1).float()
            for name, model in models.items()}


# %% [markdown]
# ## The animation
# Every frame is computed here: the digit is rotated about its centre (bilinear, black corners), both models
# classify it, and the bars show their class probabilities (the true class in green) next to a thumbnail of what
# each model sees. The GIF and, when `imageio-ffmpeg` is installed, an mp4 of the same frames are written to
# `out_dir` with a provenance sidecar (`Rotation.json`).

# %%
def render_frame(rotated: torch.Tensor, angle: float, probs: dict[str, torch.Tensor]) -> np.ndarray:
    """One 600 x 420 frame: the rotated digit left; per model its input thumbnail and its class probabilities."""
    fig = new_figure((600, 420), dpi=60)
    grid = fig.add_gridspec(len(probs), 3, width_ratios=(2, 0.45, 1), left=0.05, right=0.98, top=0.88, bottom=0.08,
                            hspace=0.55, wspace=0.3)
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(rotated.squeeze().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"Degree: {angle:g}")
    for row, (name, p) in enumerate(probs.items()):
        thumb = fig.add_subplot(grid[row, 1])
        thumb.imshow(views[name](rotated).squeeze().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        thumb.set_title("its input", fontsize=9)
        thumb.set_xticks([])
        thumb.set_yticks([])
        bar = fig.add_subplot(grid[row, 2])
        bar.bar(range(len(p)), p.cpu().numpy(), color=["tab:green" if c == label else "tab:blue" for c in range(len(p))])
        bar.set_ylim(0, 1)
        bar.set_xticks(range(len(p)))
        bar.set_yticks(np.linspace(0, 1, 6))
        bar.set_title(name)
        bar.set_xlabel("Number")
        bar.set_ylabel("Probability")
    fig.suptitle("Effect image rotation GE-ViT and Vision Transformer model")
    return figure_to_array(fig, dpi=60)


start = time.time()
n = settings.rotation_frames
angles = (torch.arange(n, dtype=torch.float64) * (360.0 / n)).tolist()
rotated = torch.stack([rotate(image, a, "bilinear") for a in angles])  # [A, 1, H, W]
probs = probabilities(rotated)  # model -> [A, classes]
frames = [render_frame(rotated[i], a, {k: p[i] for k, p in probs.items()})  # a bar in JupyterLab, none in batch runs
          for i, a in enumerate(tqdm(angles, desc="frames", disable=not interactive))]
frame_ms, fps = max(20.0, 6000.0 / n), max(1, round(n / 6.0))  # one turn in 6 seconds
gif = save_gif(frames, out_dir / "Rotation.gif", duration_ms=frame_ms, sidecar=False)
mp4 = save_mp4(frames, out_dir / "Rotation.mp4", fps=fps)
write_sidecar(out_dir / "Rotation.json", [gif] + ([mp4] if mp4 else []), frames=n, frame_ms=frame_ms,
              mp4_fps=fps if mp4 else None, angle_step_deg=360.0 / n, label=label, interpolation="bilinear",
              model_inputs={"GE-ViT": "normalised", "Vision Transformer": "transposed, normalised"},
              frames_correct={k: int((p.argmax(-1) == label).sum()) for k, p in probs.items()}, **meta)
print(f"{n} frames in {time.time() - start:.0f} s -> {gif}"
      + (f" and {mp4}" if mp4 else " (no mp4: imageio-ffmpeg not installed)"))
display(Image(filename=str(gif)))

# %% [markdown]
# ## How often is each model right?
# The fraction of frames (angles) in which each model predicts the digit's true class, and its lowest probability
# for the true class over the whole turn.

# %%
for name, p in probs.items():
    correct = float((p.argmax(-1) == label).double().mean())
    lowest = int(p[:, label].argmin())
    print(f"{name:>20}: right in {correct:6.1%} of the angles; lowest p(true class) = "
          f"{float(p[lowest, label]):.3f} at {angles[lowest]:g} degrees")

# %% [markdown]
# ## Turn it yourself
# In JupyterLab the slider below recomputes both predictions for any angle (it needs `ipywidgets`). A batch run
# (`make reproduce`, or papermill with `-p interactive False`) draws the 45-degree frame instead: a slider means
# nothing in an executed notebook, and executing widget cells headless can deadlock the notebook client
# (jupyter/nbclient#312, jupyter/nbconvert#2029).

# %%
from PIL import Image as PILImage


def show(angle: int = 45) -> None:
    turned = rotate(image, angle, "bilinear")
    frame = render_frame(turned, angle, {k: p[0] for k, p in probabilities(turned[None]).items()})
    display(PILImage.fromarray(frame))


try:
    import ipywidgets
except ImportError:
    ipywidgets = None
    if interactive:
        print("ipywidgets is not installed: no slider (pip install ipywidgets)")
if interactive and ipywidgets is not None:
    ipywidgets.interact(show, angle=ipywidgets.IntSlider(value=45, min=0, max=359, step=1))
else:
    show(45)
