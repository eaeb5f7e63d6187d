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
weights = None  # None: the published vit_rotmnist_10pct; or a best.pt of `python -m gevit_lib.run`
interactive = True  # the knobs at the end (ipywidgets); batch runs (papermill) pass False

# %%
import copy
from pathlib import Path

import torch
from IPython.display import Image, Markdown, display

from gevit_lib.augment import random_rotation
from gevit_lib.benchmark import images_per_second
from gevit_lib.canonical import Canonicalized
from gevit_lib.data import MNIST_BACKGROUND, evenly_spaced, random_subset, take_subset
from gevit_lib.notebook import published_model, rotated_digits
from gevit_lib.post_results import post_result
from gevit_lib.posthoc import (CACHED_TRAINING_NOTE, KEPT_EPOCH_NOTE, METHODS, EmbeddingCache, PostHoc,
                              shares_embeddings)
from gevit_lib.profiles import posthoc_profile
from gevit_lib.train import TrainConfig, evaluate, fit, seed_everything
from gevit_lib.viz import plot_accuracy_vs_cost, save_figure, save_table

out_dir, run_dir = Path(out_dir), Path(run_dir) / profile
backbone, checkpoint = published_model("vit_rotmnist_10pct", profile, weights)
settings = posthoc_profile("low_data", profile)  # subset sizes, epochs, groups of this profile
train_ds, _ = rotated_digits("train", profile, data_dir, fraction=0.1)  # the same 10% the backbone was trained on
(val_ds, _), (test_ds, data_source) = (rotated_digits(s, profile, data_dir) for s in ("validation", "test"))
train = take_subset(train_ds, random_subset(len(train_ds), settings.n_train, seed))  # finetuning set
val = take_subset(val_ds, evenly_spaced(len(val_ds), settings.n_val))  # model selection only
test = take_subset(test_ds, evenly_spaced(len(test_ds), settings.n_test))
print(f"checkpoint: {checkpoint}\ndata: {data_source}\n{settings}")

# %% [markdown]
# ## The loop over methods
# As in notebook 6, with finetuning on the same 10% of the training split.

# %%
methods = ["mean", "max", "sum", "most_probable", "most_certain", "learned_score", "learned_attention", "tta"]
runs = [(m, settings.learned_group if METHODS[m].learned else settings.tta_group if m == "tta" else settings.group,
         True) for m in methods]  # (method, group, in the post)
runs += [(m, g, False) for g in settings.extra_learned_groups for m in methods if METHODS[m].learned]
runs += [("canonical", g, False) for g in settings.canonical_groups]  # learned canonicalization (not in the post)
augment = random_rotation(180.0, fill=MNIST_BACKGROUND)  # finetuning: RandomRotation(-180, 180), as the original
canon_fit = (train, augment)  # canonicalization: the finetuning digits, randomly rotated
cache = EmbeddingCache({"train": train, "val": val, "test": test}, batch_size=settings.eval_batch_size,
                       device=device, progress=interactive or settings.n_test is None, directory=run_dir / "embeddings")
base = [100 * evaluate(backbone, d, batch_size=settings.eval_batch_size, device=device)["accuracy"]
        for d in (val, test)]
speed_images = torch.stack([test_ds[i][0] for i in range(settings.speed_batch)]).to(device)  # the images/s batch
speed = {("base", "-"): images_per_second(backbone.to(device), speed_images, settings.speed_repeats)}
rows, fitted = [], {}
for mode in settings.modes:
    rows.append({"mode": mode, "method": "base", "post_name": "base model", "group": "-", "in_post": True,
                 "kept_epoch": "", "passes": 1, "acc": base})
    for method, group, in_post in runs:
        seed_everything(seed)  # every method starts from the same random state
        canon = method == "canonical"  # trained on images: the canonical pose depends on the input
        wrapper = fitted[mode, method, group] = (
            Canonicalized(copy.deepcopy(backbone), group, finetune=mode, prior_weight=settings.canonical_prior)
            if canon else PostHoc(copy.deepcopy(backbone), method, group, finetune=mode))
        trains = mode != "none" or canon or METHODS[method].learned
        shared = not canon and shares_embeddings(wrapper, trains)
        on_cache, kept = settings.cached_training and shared, ""  # cached: un-augmented training embeddings
        if trains:
            epochs = {"learned_attention": settings.epochs_attention, "canonical": settings.canonical_epochs}
            config = TrainConfig(epochs=epochs.get(method, settings.epochs), batch_size=settings.batch_size,
                                 optimizer=settings.optimizer, lr=settings.lr, momentum=settings.momentum,
                                 nesterov=settings.nesterov, seed=seed, device=device, select_initial=True,
                                 eval_batch_size=settings.eval_batch_size, label=f"{method}/{mode}")
            fit_train, fit_augment = (canon_fit if canon else (cache(wrapper, "train"), None) if on_cache
                                      else (train, augment))
            kept = fit(wrapper, fit_train, cache(wrapper, "val") if shared else val, config, augment=fit_augment,
                       loss_fn=wrapper.loss if canon else None, resume=True, progress=interactive,  # 0: initial
                       run_dir=run_dir / "fits" / mode / f"{method}_{group}").best_epoch
        data = [cache(wrapper, split) for split in ("val", "test")] if shared else [val, test]
        acc = [100 * evaluate(wrapper, d, batch_size=settings.eval_batch_size, device=device)["accuracy"]
               for d in data]
        if (method, group) not in speed:  # the same in every mode: measured once, on the images
            speed[method, group] = images_per_second(wrapper.to(device), speed_images, settings.speed_repeats)
        name = f"learned canonicalization ({'exact' if wrapper.exact else 'approximate'})" if canon else (
            METHODS[method].post_name)
        rows.append({"mode": mode, "method": method, "post_name": name, "group": wrapper.group.name,
                     "in_post": in_post, "kept_epoch": kept, "passes": wrapper.backbone_passes, "acc": acc})
        print(f"[{mode}] {method} {group}: val {acc[0]:.2f} test {acc[1]:.2f}, kept epoch {kept}")

# %% [markdown]
# ## The table
# Our numbers next to the post's.

# %%
table = []
for r in rows:
    post = post_result("low_data", r["mode"], r["method"]) if r["in_post"] else None
    table.append({**{k: v for k, v in r.items() if k != "acc"}, "img_s": round(speed[r["method"], r["group"]], 1),
                  "val_acc": round(r["acc"][0], 2), "test_acc": round(r["acc"][1], 2),
                  "post_val_acc": post.val_acc if post else "",
                  "post_test_acc": post.test_acc if post else ""})
speed_note = (f"images/s measured in this run on {device} ({torch.get_num_threads()} threads): "
              f"{settings.speed_batch} test images, best of {settings.speed_repeats} calls after a warm-up")
title = f"Post-hoc equivariance: low_data (profile {profile})"
title += f"; {CACHED_TRAINING_NOTE}" if settings.cached_training else ""
_, md = save_table(table, out_dir / "posthoc_low_data.csv", title=title, data_source=data_source,
                   checkpoint=checkpoint, profile=profile, seed=seed, n_val=len(val[1]), n_test=len(test[1]),
                   post_numbers="gevit_lib.post_results (the post's tables)", cached_training=settings.cached_training,
                   kept_epoch=KEPT_EPOCH_NOTE, in_post="False: not in the post (its learned aggregators used D4)",
                   passes="backbone passes per image", img_s=speed_note)
display(Markdown(md.read_text()))

# %% [markdown]
# ## Accuracy against cost
# As in notebook 6: `passes` backbone passes per image (the group's order for the wrappers of transformed copies, 1
# for canonicalization and the base model), `img_s` measured in this run on this machine. With little training
# data the learned methods (aggregators and the canonicalization net) have little to learn from, and the fixed
# aggregators need no training at all: compare them at equal cost (a method is worth its passes only if no faster
# point of the plot sits at or above it), and the D4 learned rows with the C16 ones to separate the group from the
# method.

# %%
fig = plot_accuracy_vs_cost(table, title=f"Accuracy against cost, low_data (profile {profile})")
path = save_figure(fig, out_dir / "posthoc_low_data_cost.png", dpi=100, data_source=data_source, checkpoint=checkpoint,
                   profile=profile, seed=seed, device=device, speed=speed_note)
display(Image(filename=str(path)))

# %% [markdown]
# ## Turn it yourself
# Pick a test digit and an angle: the digit turned by it (bilinear, background fill) and the prediction and
# confidence of the plain model and of every post-hoc method of the table without finetuning (the learned
# aggregators as trained above). The predictions for three test digits at every 15 degrees are computed once here
# (`posthoc_knob`: one backbone pass per group, aggregated by every method of that group); a knob only picks one.
# A batch run (papermill, `interactive=False`) draws the first of them at 45 degrees.

# %%
from gevit_lib.notebook import posthoc_knob

names = {(r["method"], r["group"]): r["post_name"] for r in rows}
wrappers = {f"{names[m, g]} ({g})": w for (mode, m, g), w in fitted.items() if mode == "none"}
knob = posthoc_knob(backbone, wrappers, test_ds, interactive, device)
