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
# # 8. Post-hoc equivariance with little data
#
# Experiment 3 of the post: a ViT trained on only 10% of rotated MNIST (1,000 images; published checkpoint
# `vit_rotmnist_10pct`). With little data the plain ViT cannot learn rotation robustness from examples alone, and
# the post-hoc wrappers add it for free; finetuning uses the same 10% of the training split. The post compares this
# with GE-ViT trained on the same 10%.

# %% tags=["parameters"]
profile = "quick"  # "smoke" (seconds) | "quick" (2-core CPU, minutes) | "full" (the post's settings, GPU)
device = "cpu"
data_dir = None  # default: $GEVIT_DATA_DIR, then ./data
out_dir = "../figures"
run_dir = "../runs/08_posthoc_low_data"
seed = 42

# %%
from pathlib import Path

from IPython.display import Markdown, display

from gevit_lib.experiments import posthoc, posthoc_figures
from gevit_lib.notebook import digits_root, published_model

out_dir, run_dir = Path(out_dir), Path(run_dir)
backbone, checkpoint = published_model("vit_rotmnist_10pct", profile)
root, data_source = digits_root(profile, data_dir)
print(f"checkpoint: {checkpoint}\ndata: {data_source}")

# %%
result = posthoc.low_data(profile, checkpoint=backbone, root=root, device=device, seed=seed,
                          out_dir=run_dir / profile, progress=False)
result.meta["checkpoint"] = checkpoint
display(Markdown(result.markdown()))

# %%
table = posthoc_figures.save_comparison(result, out_dir, "posthoc_low_data", data_source=data_source,
                                        checkpoint=checkpoint, seed=seed)
display(Markdown(table.with_suffix(".md").read_text()))
