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
# # 9. Post-hoc equivariance on PatchCamelyon with a pretrained CNN
#
# Experiment 4 of the post: histopathology patches (PCam, 96x96 RGB, tumour / no tumour) have no preferred
# orientation, so rotations by 90 degrees and flips (the group D4, 8 copies) are exact symmetries of the task. The
# backbone is a CNN pretrained on PCam by TIAToolbox, loaded through timm from the Hugging Face hub: the post names
# the ResNet-50, while its code loaded the DenseNet-161 (`backbone_name` picks either). No learned aggregators here,
# as in the post.
#
# This notebook needs the PCam HDF5 files (torchvision `PCAM` format, in `<data_dir>/pcam/`) and the CNN's weights
# (Hugging Face cache or `weights=`). Without them it stops with a message saying what to download. The `smoke`
# profile instead runs the same code path on a small generated PCam-format file with an untrained tiny CNN, so the
# pipeline is tested everywhere; its numbers mean nothing and are labelled as such.

# %% tags=["parameters"]
profile = "quick"  # "smoke" (seconds) | "quick" (2-core CPU, minutes) | "full" (the post's settings, GPU)
device = "cpu"
data_dir = None  # default: $GEVIT_DATA_DIR, then ./data
out_dir = "../figures"
run_dir = "../runs/09_posthoc_pcam"
seed = 42
backbone_name = "densenet161.tiatoolbox-pcam"  # what the original code loaded; the post names "resnet50.tiatoolbox-pcam"
weights = None  # optional local weights file of that Hugging Face repo (offline use)

# %%
import copy
import tempfile
from pathlib import Path

import torch
from IPython.display import Image, Markdown, display

from gevit_lib.augment import random_d4
from gevit_lib.benchmark import images_per_second
from gevit_lib.canonical import Canonicalized
from gevit_lib.data import evenly_spaced, pcam, random_subset, take_subset
from gevit_lib.testing import write_fake_pcam
from gevit_lib.files import MissingFileError
from gevit_lib.post_results import post_result
from gevit_lib.posthoc import METHODS, EmbeddingCache, PostHoc, load_pcam_cnn, shares_embeddings
from gevit_lib.profiles import posthoc_profile
from gevit_lib.train import TrainConfig, evaluate, fit, seed_everything
from gevit_lib.viz import plot_accuracy_vs_cost, save_figure, save_table

out_dir, run_dir = Path(out_dir), Path(run_dir) / profile
settings = posthoc_profile("pcam", profile)
if profile == "smoke":  # the same code path on generated data with an untrained tiny CNN: nothing to download
    import timm

    data_dir = Path(tempfile.mkdtemp(prefix="fake_pcam_"))
    write_fake_pcam(data_dir, n_per_split=16, seed=seed)
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=2).eval()
    checkpoint, data_source = "untrained timm test_resnet (smoke)", "synthetic PCam-format data (smoke)"
else:
    checkpoint, data_source = f"{backbone_name} ({weights or 'Hugging Face hub'})", "PCam (torchvision h5)"
try:  # the TIAToolbox CNNs take [0, 1] pixels, as in the original; the smoke CNN normalised ones
    splits = {s: pcam(s, root=data_dir, normalize=profile == "smoke") for s in ("train", "validation", "test")}
    if profile != "smoke":
        backbone = load_pcam_cnn(backbone_name, weights)
    available = True
except MissingFileError as exc:
    available = False
    print(f"PCam experiment skipped: {exc}")
if available:
    train = take_subset(splits["train"], random_subset(len(splits["train"]), settings.n_train, seed))
    val = take_subset(splits["validation"], evenly_spaced(len(splits["validation"]), settings.n_val))
    test = take_subset(splits["test"], evenly_spaced(len(splits["test"]), settings.n_test))
    print(f"checkpoint: {checkpoint}\ndata: {data_source}\n{settings}")

# %% [markdown]
# ## The loop over methods
# As in notebook 6, with the original's PCam finetuning: SGD with Nesterov momentum, random 90-degree rotations and
# flips, the best validation epoch kept; finished fits in `run_dir` are reused. The CNN has BatchNorm, whose
# running statistics change in training mode, so the finetuned rows run the wrapper on the images themselves.
# Learned canonicalization (not in the post; C4 and D4, both exact) trains its small G-CNN on the same randomly
# rotated and flipped images; `passes` and `img_s` give every row's cost, as in notebooks 6-8.

# %%
if available:
    methods = ["mean", "max", "sum", "most_probable", "most_certain", "tta"]  # no learned aggregators for PCam
    runs = [(m, settings.tta_group if m == "tta" else settings.group) for m in methods]
    runs += [("canonical", g) for g in settings.canonical_groups]  # learned canonicalization (not in the post)
    augment = random_d4()  # finetuning: random 90-degree rotations and flips, as the original
    cache = EmbeddingCache({"val": val, "test": test}, batch_size=settings.eval_batch_size, device=device)
    base = [100 * evaluate(backbone, d, batch_size=settings.eval_batch_size, device=device)["accuracy"]
            for d in (val, test)]
    speed_images = torch.stack([test[i][0] for i in range(settings.speed_batch)]).to(device)  # the images/s batch
    speed = {("base", "-"): images_per_second(backbone.to(device), speed_images, settings.speed_repeats)}
    rows = []
    for mode in settings.modes:
        rows.append({"mode": mode, "method": "base", "post_name": "base model", "group": "-", "passes": 1,
                     "acc": base})
        for method, group in runs:
            seed_everything(seed)  # every method starts from the same random state
            canon = method == "canonical"  # trained on images: the canonical pose depends on the input
            wrapper = (Canonicalized(copy.deepcopy(backbone), group, finetune=mode) if canon
                       else PostHoc(copy.deepcopy(backbone), method, group, finetune=mode))
            trains = mode != "none" or canon
            shared = not canon and shares_embeddings(wrapper, trains)
            if trains:
                epochs = settings.canonical_epochs if canon else settings.epochs
                config = TrainConfig(epochs=epochs, batch_size=settings.batch_size, optimizer=settings.optimizer,
                                     lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov, seed=seed,
                                     device=device, eval_batch_size=settings.eval_batch_size, select_initial=True,
                                     label=f"{method}/{mode}")
                fit(wrapper, train, cache(wrapper, "val") if shared else val, config, augment=augment, progress=False,
                    loss_fn=wrapper.loss if canon else None, resume=True,  # resume: reuse a finished fit
                    run_dir=run_dir / "fits" / mode / (f"canonical_{group}" if canon else method))
            data = [cache(wrapper, split) for split in ("val", "test")] if shared else [val, test]
            acc = [100 * evaluate(wrapper, d, batch_size=settings.eval_batch_size, device=device)["accuracy"]
                   for d in data]
            if (method, group) not in speed:  # the same in every mode: measured once, on the images
                speed[method, group] = images_per_second(wrapper.to(device), speed_images, settings.speed_repeats)
            name = "learned canonicalization (exact)" if canon else METHODS[method].post_name
            rows.append({"mode": mode, "method": method, "post_name": name, "group": wrapper.group.name,
                         "passes": wrapper.backbone_passes, "acc": acc})
            print(f"[{mode}] {method}: val {acc[0]:.2f} test {acc[1]:.2f}")

# %% [markdown]
# Our numbers next to the post's (the authors' result files were produced on the full 32,768-image validation and
# test splits).

# %%
if available:
    table = []
    for r in rows:
        post = post_result("pcam", r["mode"], r["method"]) if r["method"] != "canonical" else None
        table.append({**{k: v for k, v in r.items() if k != "acc"}, "in_post": r["method"] != "canonical",
                      "img_s": round(speed[r["method"], r["group"]], 1), "val_acc": round(r["acc"][0], 2),
                      "test_acc": round(r["acc"][1], 2), "post_val_acc": post.val_acc if post else "",
                      "post_test_acc": post.test_acc if post else ""})
    title = f"Post-hoc equivariance: pcam (profile {profile})"
    speed_note = (f"images/s measured in this run on {device} ({torch.get_num_threads()} threads): "
                  f"{settings.speed_batch} test images, best of {settings.speed_repeats} calls after a warm-up")
    _, md = save_table(table, out_dir / "posthoc_pcam.csv", title=title, data_source=data_source,
                       checkpoint=checkpoint, profile=profile, seed=seed, n_val=len(val), n_test=len(test),
                       post_numbers="gevit_lib.post_results (the post's tables)", passes="backbone passes per image",
                       img_s=speed_note)
    display(Markdown(md.read_text()))
    fig = plot_accuracy_vs_cost(table, title=f"Accuracy against cost, pcam (profile {profile})")
    path = save_figure(fig, out_dir / "posthoc_pcam_cost.png", dpi=100, data_source=data_source, checkpoint=checkpoint,
                       profile=profile, seed=seed, device=device, speed=speed_note)
    display(Image(filename=str(path)))

