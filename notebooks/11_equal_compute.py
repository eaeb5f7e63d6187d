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
# # 11. Speed at equal compute: accuracy against training time
#
# Notebook 10 measures how many images per second each model trains on, and what it reaches after a fixed number
# of epochs. "N x faster at comparable accuracy" needs both at once: here every model family gets the **same
# training time** on rotated MNIST, and we draw its validation accuracy against the seconds spent training. The
# families (built as in notebook 10, at the model-zoo sizes of the same profile):
#
# - the post's plain ViT (no symmetry);
# - the invariant patch-embedding model, p4 and its exactly equivariant p4m variant;
# - the hybrid G-CNN -> GE-ViT (p4; p4m at `full`);
# - GE-ViT p4 on the full image (and p4m at `full`): slow, and given the same budget, which is the point.
#
# The yardstick is the accuracy of the GE-ViT p4 the authors published (`gevit_p4sa_patch5_rotmnist`), measured by
# this project on 22,000 test digits (`gevit_lib.post_results.CHECKPOINT_ACCURACY`; docs/published_checkpoints.md):
# how long does each family train until its validation accuracy first reaches it?
#
# How the budget is spent: training runs in chunks of a fixed number of images (a seeded pass over the training
# digits, cut into pieces; a new order every pass), one `fit` epoch per chunk with a validation pass after it, and
# `fit(..., resume=True)` continues the run chunk by chunk until the chunks' **training seconds** (the optimizer
# steps alone; validation, test and checkpoint writing excluded: the `train_seconds` column of `metrics.csv`) reach
# the budget. The last chunk may pass it by its own length. AdamW at a constant learning rate, so that a larger
# budget continues a finished run in `run_dir` without changing its past. Times are wall-clock on the machine
# printed below; on a machine shared with other jobs they are upper bounds.

# %% tags=["parameters"]
profile = "quick"  # "smoke" (seconds) | "quick" (180 s per family on a 2-core CPU) | "full" (1800 s, a GPU)
device = "cpu"
data_dir = None  # default: $GEVIT_DATA_DIR, then ./data
out_dir = "../figures"
run_dir = "../runs/11_equal_compute"
seed = 0
budget_s = None  # training seconds per family; None: the profile's (e.g. 1800 for the 30 minutes)
families = None  # None: the profile's; or keys of `zoo` below, e.g. ["patch_p4", "gevit_p4"]
overrides = {}  # fields of gevit_lib.profiles.EqualComputeProfile to change, e.g. {"n_test": 5000}

# %%
import json
from itertools import accumulate
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from torch.utils.data import Subset, TensorDataset

from gevit_lib.benchmark import machine_description, time_to_accuracy
from gevit_lib.data import random_subset, rotated_mnist, take_subset
from gevit_lib.models.gevit import build_gevit
from gevit_lib.models.hybrid import build_hybrid, build_patch_gevit
from gevit_lib.models.vit import build_vit
from gevit_lib.notebook import digits_root
from gevit_lib.post_results import CHECKPOINT_ACCURACY
from gevit_lib.profiles import equal_compute_profile, model_zoo_profile
from gevit_lib.train import TrainConfig, evaluate, fit, resolve_device, seed_everything
from gevit_lib.viz import save_figure, save_table

sizes, zoo_sizes = equal_compute_profile(profile, overrides), model_zoo_profile("rotmnist", profile)
budget = float(budget_s if budget_s is not None else sizes.budget_s)
out_dir, run_dir, train_device = Path(out_dir), Path(run_dir) / profile, str(resolve_device(device))
root, data_source = digits_root(profile, data_dir)
n = {"train": sizes.n_train, "validation": sizes.n_val, "test": sizes.n_test}
train, val, test = (TensorDataset(*take_subset(ds, random_subset(len(ds), n[split], seed + i)))
                    for i, split in enumerate(n) for ds in [rotated_mnist(split, root=root)])
target = CHECKPOINT_ACCURACY["gevit_p4sa_patch5_rotmnist"]
machine = machine_description(train_device)
print(f"data: {data_source}; {len(train)} / {len(val)} / {len(test)} train / validation / test digits")
print(f"budget: {budget:.0f} s of training per family; machine: {machine}; device: {train_device}; seed: {seed}")
print(f"target: {target.accuracy:.2f}%, {target.checkpoint} on {target.n:,} test digits ({target.command})")

# %% [markdown]
# ## The families
#
# One builder per family, at the architecture sizes of notebook 10's profile; the patch models use
# `sizes.patch_size` (the best validation accuracy of notebook 10's quick ablation). Each row: a name, the public
# builder and its arguments (the `group` argument is the exact symmetry), and the training images per curve point.

# %%
embed = {"embed_hidden": zoo_sizes.embed_hidden, **({"embed_dim": zoo_sizes.embed_dim} if zoo_sizes.embed_dim else {})}
zoo = {"vit": ("ViT (the post's)", build_vit, dict(preset="mnist", **zoo_sizes.vit_overrides), sizes.chunk)}
for g in ("p4", "p4m"):
    zoo[f"patch_{g}"] = (f"Patch GE-ViT {g}, patch {sizes.patch_size}", build_patch_gevit, dict(
        preset="rotmnist", group=g, patch_size=sizes.patch_size, gevit=zoo_sizes.grid_gevit, **embed), sizes.chunk)
    zoo[f"hybrid_{g}"] = (f"Hybrid G-CNN -> GE-ViT {g}", build_hybrid, dict(
        preset="rotmnist", group=g, gevit=zoo_sizes.grid_gevit, **zoo_sizes.hybrid_overrides), sizes.chunk)
    zoo[f"gevit_{g}"] = (f"GE-ViT {g}, P=5 (full image)", build_gevit, dict(
        preset="rotmnist", group=g, patch_size=5, group_index="corrected", **zoo_sizes.gevit_overrides),
                         sizes.gevit_chunk)
chosen = list(sizes.families if families is None else [families] if isinstance(families, str) else families)
if set(chosen) - set(zoo):
    raise ValueError(f"unknown families {sorted(set(chosen) - set(zoo))}; choose among {list(zoo)}")
print("families:", ", ".join(chosen), "| not run:", ", ".join(k for k in zoo if k not in chosen) or "none")


# %% [markdown]
# ## Train every family for the budget
#
# `piece(epoch, size)` is the chunk of training digits of one curve point; `train_for_budget` calls `fit` one
# chunk further at a time (each call resumes the run in `run_dir`) until the training seconds reach the budget. A
# run in `run_dir` trained past this budget is refused rather than cut: give a new `run_dir`. Before the clock
# starts, one untimed forward and backward pass (eval mode: no statistics change) builds what a first call builds
# (the fused CPU attention kernel takes ~40 s the first time; on a GPU the Triton kernels).

# %%
def piece(epoch, size):
    """The training digits of 1-based ``epoch``: consecutive chunks of a seeded order, a new order every pass."""
    size = min(size, len(train))
    done_passes, i = divmod(epoch - 1, len(train) // size)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1000 * done_passes))
    return Subset(train, order[i * size:(i + 1) * size].tolist())


def train_for_budget(key, model, size, options):
    folder = run_dir / key
    config = dict(batch_size=zoo_sizes.batch_size, optimizer="adamw", lr=sizes.lr, weight_decay=zoo_sizes.weight_decay,
                  schedule="constant", seed=seed, device=train_device, eval_batch_size=zoo_sizes.eval_batch_size,
                  label=key)
    record = {"family": key, **options, "chunk": size, "n_train": len(train)}  # a resume with others is refused
    summary = folder / "metrics.json"
    epoch = max(1, json.loads(summary.read_text())["epochs_completed"] if summary.exists() else 0)
    while True:
        result = fit(model, piece(epoch, size), val, TrainConfig(epochs=epoch, **config), run_dir=folder,
                     resume=True, progress=False, model_config=record)
        spent = list(accumulate(r["train_seconds"] for r in result.history))
        needed = next((k + 1 for k, s in enumerate(spent) if s >= budget), None)
        if needed is not None and needed < result.epochs_completed:
            raise ValueError(f"{folder} holds {result.epochs_completed} chunks ({spent[-1]:.0f} s of training), "
                             f"more than this budget of {budget:.0f} s needs ({needed}); use another run_dir")
        if needed is not None:
            return result
        epoch = result.epochs_completed + 1


rows, curves = [], {}
for key in chosen:
    name, build, options, size = zoo[key]
    seed_everything(seed)
    model = build(**options).to(train_device).eval()
    model(train[:zoo_sizes.batch_size][0].to(train_device)).sum().backward()  # warm-up: kernels built, untimed
    model.zero_grad(set_to_none=True)
    result = train_for_budget(key, model, size, options)
    seconds = [r["train_seconds"] for r in result.history]
    acc = [100.0 * r["val_acc"] for r in result.history]
    curves[name] = (list(accumulate(seconds)), acc)
    t_target = time_to_accuracy(seconds, acc, target.accuracy)
    test_acc = 100.0 * evaluate(model, test, batch_size=zoo_sizes.eval_batch_size, device=train_device)["accuracy"]
    rows.append({"family": name, "key": key, "group": options.get("group", "none"), "budget_s": budget,
                 "params": sum(p.numel() for p in model.parameters()), "chunks": len(seconds),
                 "images": len(seconds) * min(size, len(train)), "train_s": sum(seconds),
                 "val_acc": 100.0 * result.best_val["accuracy"], "test_acc": test_acc, "t_target_s": t_target,
                 "reached": "yes" if t_target is not None else "not reached"})
    print(f"{name}: {len(seconds)} chunks, {sum(seconds):.0f} s, best val {rows[-1]['val_acc']:.1f}%, test "
          f"{test_acc:.1f}%, target {'reached after %.0f s' % t_target if t_target is not None else 'not reached'}")

# %% [markdown]
# ## Validation accuracy against training time
#
# One curve per family, a point per chunk (log time axis), the budget as a vertical line and the published p4
# GE-ViT's measured test accuracy as a horizontal one.

# %%
meta = dict(data_source=data_source, profile=profile, seed=seed, budget_s=budget, machine=machine,
            train_device=train_device, torch_threads=torch.get_num_threads(), target_acc=round(target.accuracy, 2),
            checkpoint=f"none (every model trained in this run; the target is {target.checkpoint}'s accuracy, "
                       f"{target.correct}/{target.n} test digits)")
fig, ax = plt.subplots(figsize=(10, 6))
for name, (x, y) in curves.items():
    ax.plot(x, y, marker="o", ms=3, label=name)
ax.axhline(target.accuracy, ls="--", color="grey", label=f"{target.checkpoint} ({target.accuracy:.2f}%, test)")
ax.axvline(budget, ls=":", color="black", label=f"budget ({budget:.0f} s)")
ax.set(xscale="log", xlabel=f"training seconds (optimizer steps only; {train_device}: {machine})",
       ylabel=f"validation accuracy (%, {len(val)} digits)",
       title=f"Equal compute on rotated MNIST ({profile}): {budget:.0f} s of training per family, seed {seed}")
ax.legend(loc="upper left", fontsize=9)
ax.grid(True, ls="--", alpha=0.5)
fig.tight_layout()
save_figure(fig, out_dir / "equal_compute_rotmnist_curves.png", **meta,
            curves={name: {"train_s": x, "val_acc": y} for name, (x, y) in curves.items()})

# %% [markdown]
# ## The table, and the time-to-accuracy ratios
#
# Per family: parameters, chunks and images trained on, training seconds used, the best validation accuracy, the
# test accuracy of that chunk's weights, the training seconds until validation accuracy first reached the target,
# and GE-ViT p4's time divided by the family's where both reached it. Where a family reached the target and GE-ViT p4
# did not, GE-ViT p4's time to the target is more than the training seconds it spent, so their ratio to the
# family's time is a measured lower bound (`ratio_at_least`).

# %%
reference = next((r for r in rows if r["key"] == "gevit_p4"), None)
for r in rows:
    reached = reference is not None and r is not reference and r["t_target_s"] is not None
    r["ratio_vs_gevit_p4"] = reference["t_target_s"] / r["t_target_s"] if (
        reached and reference["t_target_s"] is not None) else None
    r["ratio_at_least"] = reference["train_s"] / r["t_target_s"] if (
        reached and reference["t_target_s"] is None) else None
columns = ["family", "group", "params", "budget_s", "chunks", "images", "train_s", "val_acc", "test_acc", "t_target_s",
           "reached", "ratio_vs_gevit_p4", "ratio_at_least"]
_, md = save_table([{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
                   out_dir / "equal_compute_rotmnist.csv", columns=columns, **meta,
                   title=f"Equal compute: {budget:.0f} s of training per family (rotated MNIST, {profile})")
display(Markdown(md.read_text()))
print(f"budget {budget:.0f} s per family; machine: {machine}; device {train_device}; seed {seed}; target "
      f"{target.accuracy:.2f}% on {len(val)} validation digits")
for r in rows:
    reached = f"{r['family']} reached {target.accuracy:.2f}% after {r['t_target_s'] or 0:.1f} s of training"
    if r["ratio_vs_gevit_p4"] is not None:
        ratio, how = r["ratio_vs_gevit_p4"], "faster" if r["ratio_vs_gevit_p4"] >= 1 else "slower"
        print(f"{reached}, GE-ViT p4 after {reference['t_target_s']:.1f} s: {max(ratio, 1 / ratio):.1f} x {how} to "
              "this accuracy (measured)")
    elif r["ratio_at_least"] is not None:
        print(f"{reached}, GE-ViT p4 had not after {reference['train_s']:.0f} s: at least {r['ratio_at_least']:.1f} x "
              "faster to this accuracy (a measured lower bound)")
if reference is None or not any(r["ratio_vs_gevit_p4"] or r["ratio_at_least"] for r in rows):
    print("no 'x faster' ratio: " + ("GE-ViT p4 was not run" if reference is None else
          f"no family reached {target.accuracy:.2f}% beside GE-ViT p4") + "; only measured ratios are printed")
