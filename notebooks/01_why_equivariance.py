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
# Recipe (the post's, SPEC 7.2): the first "8" at or after position 18 of the rotated-MNIST training split
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

from IPython.display import Image, display

from gevit_lib.experiments import figures
from gevit_lib.train import seed_everything

seed_everything(seed)
out_dir = Path(out_dir)
settings = figures.figure_profile(profile)
digit = figures.rotation_digit(profile, data_dir)
views = figures.rotation_views(profile, device)
label = int(digit.labels[0])
meta = dict(data_source=digit.data_source, checkpoint=", ".join(v.checkpoint for v in views.values()),
            profile=profile, seed=seed, inputs=digit.describe())
print(f"data: {digit.data_source}, {digit.split} split, index {digit.indices[0]}, digit {label}")
for name, view in views.items():
    print(f"{name}: {view.checkpoint} ({'transposed' if view.transpose else 'as stored'})")
print(f"frames: {settings.rotation_frames} (every {360 / settings.rotation_frames:g} degrees)")

# %% [markdown]
# ## The animation
# Every frame is computed here: both models classify the rotated digit, and the bars show their class
# probabilities (the true class in green). The GIF and, when `imageio-ffmpeg` is installed, an mp4 of the same
# frames are written to `out_dir` with a provenance sidecar (`Rotation.json`).

# %%
start = time.time()
result = figures.rotation_animation(views, digit.images[0], label, settings.rotation_frames, out_dir, meta=meta)
print(f"{settings.rotation_frames} frames in {time.time() - start:.0f} s -> {result.gif}"
      + (f" and {result.mp4}" if result.mp4 else " (no mp4: imageio-ffmpeg not installed)"))
display(Image(filename=str(result.gif)))

# %% [markdown]
# ## How often is each model right?
# The fraction of frames (angles) in which each model predicts the digit's true class, and its lowest probability
# for the true class over the whole turn.

# %%
for name, probs in result.probabilities.items():
    correct = result.accuracy()[name]
    print(f"{name:>20}: right in {correct:6.1%} of the angles; lowest p(true class) = "
          f"{float(probs[:, label].min()):.3f} at {float(result.angles[probs[:, label].argmin()]):g} degrees")

# %% [markdown]
# ## Turn it yourself
# In JupyterLab the slider below recomputes both predictions for any angle (it needs `ipywidgets`). A batch run
# (`make reproduce`, or papermill with `-p interactive False`) draws the 45-degree frame instead: a slider means
# nothing in an executed notebook, and executing widget cells headless can deadlock the notebook client
# (jupyter/nbclient#312, jupyter/nbconvert#2029).

# %%
from PIL import Image as PILImage


def show(angle: int = 45) -> None:
    display(PILImage.fromarray(figures.rotation_frame_at(views, digit.images[0], angle, label)))


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
