"""Speed, size and memory of every model of the "faster equivariant ViTs" table, on random inputs.

For the plain ViT, the post-hoc ViT (mean over T = 4, 8, 16 copies), GE-ViT (p4 / p4m, neighbourhood 5 / 9), the
invariant patch-embedding models and the hybrid G-CNN -> GE-ViT, at the architecture sizes of a model-zoo profile
(``gevit_lib.profiles.model_zoo_profile``, ``--profile``): parameters, training and inference images/s, and peak
memory during training, on every device given (default: CPU, plus CUDA when available). Measured here, in this
run with ``gevit_lib.benchmark.speed_row`` (warm-up batch, then up to ``--steps`` timed batches; a model whose one
batch exceeds ``--budget`` seconds gets fewer batches, or no training timing: the note says so).

    python benchmarks/model_zoo.py                                   # rotated MNIST sizes of "quick", CPU (+ GPU)
    python benchmarks/model_zoo.py --dataset pcam --profile full --devices cuda --batch 32
    python benchmarks/model_zoo.py --only patch hybrid --out runs/benchmarks/model_zoo.json

The same table with the accuracy each model reaches (training included) is notebook 10
(``notebooks/10_modern_equivariant_vit.ipynb``; parameters ``dataset``, ``profile``, ``models``, ``overrides``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from gevit_lib.benchmark import default_devices, speed_row
from gevit_lib.groups import get_group
from gevit_lib.models.gevit import build_gevit
from gevit_lib.models.hybrid import build_hybrid, build_patch_gevit
from gevit_lib.models.vit import build_vit
from gevit_lib.posthoc import PostHoc
from gevit_lib.profiles import MODEL_ZOO_DATASETS, ModelZooProfile, model_zoo_profile

FAMILIES = ("vit", "posthoc", "gevit", "patch", "hybrid")
INPUT = {"rotmnist": ((1, 28, 28), 10), "pcam": ((3, 96, 96), 2)}


INVARIANCE = {None: "none", "p4": "exact: rot90", "C4": "exact: rot90", "p4m": "exact: rot90, flips",
              "D4": "exact: rot90, flips", "C8": "exact: rot90; approx. 45 deg",
              "C16": "exact: rot90; approx. 22.5 deg"}
Row = tuple[str, str, str | None, Callable[[], torch.nn.Module]]


def models(dataset: str, sizes: ModelZooProfile) -> Iterator[Row]:
    """(family, name, group, builder) of every row of notebook 10's table, in table order (untrained models)."""
    vit = lambda: build_vit("mnist" if dataset == "rotmnist" else "pcam", **sizes.vit_overrides)  # noqa: E731
    yield "vit", "ViT", None, vit
    for g in sizes.posthoc_groups:
        yield ("posthoc", f"ViT + post-hoc mean ({g}, T={len(get_group(g))})", g,
               lambda g=g: PostHoc(vit(), "mean", g, subgroup_exact=True, finetune="model"))
    for g, p in sizes.gevit_models:
        yield ("gevit", f"GE-ViT {g}, P={p}", g,
               lambda g=g, p=p: build_gevit(dataset, g, patch_size=p, group_index="corrected", **sizes.gevit_overrides))
    embed = {"embed_hidden": sizes.embed_hidden, **({"embed_dim": sizes.embed_dim} if sizes.embed_dim else {})}
    patch_models = [(sizes.patch_group, p, "mean") for p in sizes.patch_sizes]
    for g, p, method in patch_models + [m for m in sizes.extra_patch_models if m not in patch_models]:
        yield ("patch", f"Patch GE-ViT {g}, patch {p} ({'mean' if method == 'mean' else 'G-CNN'} embedding)", g,
               lambda g=g, p=p, method=method: build_patch_gevit(dataset, g, patch_size=p, embed_method=method,
                                                                 gevit=sizes.grid_gevit, **embed))
    for g in sizes.hybrid_groups:
        yield ("hybrid", f"Hybrid G-CNN -> GE-ViT {g}", g,
               lambda g=g: build_hybrid(dataset, g, gevit=sizes.grid_gevit, **sizes.hybrid_overrides))


def run(dataset: str, profile: str, devices: list[str], batch: int | None, steps: int | None,
        budget: float | None, only: list[str]) -> list[dict]:
    sizes = model_zoo_profile(dataset, profile)
    input_shape, num_classes = INPUT[dataset]
    rows = []
    for family, name, group, build in models(dataset, sizes):
        if family not in only:
            continue
        torch.manual_seed(0)
        b = batch or (sizes.gevit_speed_batch if family == "gevit" else sizes.speed_batch)
        model = build()
        row = {"model": name, "invariance": INVARIANCE[group], **speed_row(
            model, input_shape, num_classes, devices, b, steps or sizes.speed_steps, budget)}
        rows.append(row)
        print(_line(row, devices), flush=True)
    return rows


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def _header(devices: list[str]) -> str:
    cols = ["model", "invariance", "params"]
    for d in devices:
        cols += [f"train img/s ({d})", f"infer img/s ({d})", f"peak MiB ({d})"]
    cols.append("note")
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def _line(row: dict, devices: list[str]) -> str:
    cells = [row["model"], row["invariance"], _fmt(row["params"])]
    for d in devices:
        cells += [_fmt(row[f"train_img_s_{d}"]), _fmt(row[f"infer_img_s_{d}"]), _fmt(row[f"peak_mem_mib_{d}"])]
    cells.append(row["note"])
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="rotmnist", choices=MODEL_ZOO_DATASETS)
    parser.add_argument("--profile", default="quick", choices=("smoke", "quick", "full"),
                        help="whose model sizes (and speed settings) to use")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--batch", type=int, default=None, help="images per timed batch (default: the profile's)")
    parser.add_argument("--steps", type=int, default=None, help="timed batches per mode (default: the profile's)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per model and mode (default: the profile's; 0 = no limit)")
    parser.add_argument("--only", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or default_devices()
    budget = None if args.budget == 0 else args.budget
    if args.budget is None:
        budget = model_zoo_profile(args.dataset, args.profile).speed_budget_s
    gpu = f", {torch.cuda.get_device_name(0)}" if "cuda" in devices else ""
    print(f"dataset {args.dataset}, model sizes of profile {args.profile}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads{gpu}")
    print(_header(devices), flush=True)
    rows = run(args.dataset, args.profile, devices, args.batch, args.steps, budget, args.only)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"dataset": args.dataset, "profile": args.profile, "devices": devices,
                                        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
