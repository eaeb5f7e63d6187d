"""Speed, size and memory of every model of the "faster equivariant ViTs" table, on random inputs.

For the plain ViT, the post-hoc ViT (mean over T = 4, 8, 16 copies), GE-ViT (p4 / p4m, neighbourhood 5 / 9), the
invariant patch-embedding models and the hybrid G-CNN -> GE-ViT, at the architecture sizes of a profile of
``gevit_lib.experiments.modern_vit`` (``--profile``): parameters, training and inference images/s, and peak
memory during training, on every device given (default: CPU, plus CUDA when available). Measured here, in this
run (``measure_speed``: warm-up batch, then up to ``--steps`` timed batches; a model whose one batch exceeds
``--budget`` seconds gets fewer batches, or no training timing: the note says so).

    python benchmarks/model_zoo.py                                   # rotated MNIST sizes of "quick", CPU (+ GPU)
    python benchmarks/model_zoo.py --dataset pcam --profile full --devices cuda --batch 32
    python benchmarks/model_zoo.py --only patch hybrid --out runs/benchmarks/model_zoo.json
    python benchmarks/model_zoo.py --with-accuracy --data-dir ../shared/data   # also train: the experiment itself

``--with-accuracy`` runs :func:`gevit_lib.experiments.modern_vit.model_zoo` (training and evaluation at the
profile's sizes, table and ablation plot written to ``--out-dir``) instead of the speed-only loop.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gevit_lib.experiments.modern_vit import (
    _INPUT,
    DATASETS,
    measure_speed,
    model_specs,
    model_zoo,
    modern_vit_profile,
    posthoc_mean,
)
from gevit_lib.models.vit import build_vit

FAMILIES = ("vit", "posthoc", "gevit", "patch", "hybrid")


def run(dataset: str, profile: str, devices: list[str], batch: int | None, steps: int | None,
        budget: float | None, only: list[str]) -> list[dict]:
    prof = modern_vit_profile(dataset, profile)
    input_shape, num_classes = _INPUT[dataset]
    steps = steps or prof.speed_steps
    rows = []
    for spec in model_specs(dataset, prof):
        if spec.family not in only:
            continue
        torch.manual_seed(0)
        if spec.family == "posthoc":
            vit = build_vit("mnist" if dataset == "rotmnist" else "pcam", **prof.vit_overrides)
            model = posthoc_mean(vit, spec.group, finetune="model")
        else:
            model = spec.build()
        row = {"model": spec.name, "invariance": spec.invariance, "params": sum(p.numel() for p in model.parameters())}
        notes = []
        for dev in devices:
            b = batch or (prof.gevit_speed_batch if spec.family == "gevit" else prof.speed_batch)
            s = measure_speed(model, input_shape, num_classes, dev, b, steps, budget)
            row.update({f"train_img_s_{dev}": s["train_img_s"], f"infer_img_s_{dev}": s["infer_img_s"],
                        f"peak_mem_mib_{dev}": s["peak_mem_mib"]})
            if s["note"]:
                notes.append(f"{dev}: {s['note']}")
        row["note"] = "; ".join(notes)
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
    parser.add_argument("--dataset", default="rotmnist", choices=DATASETS)
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
    parser.add_argument("--with-accuracy", action="store_true", help="run the training experiment instead")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", default=None, help="--with-accuracy: where the table and plot go")
    parser.add_argument("--device", default="cpu", help="--with-accuracy: training device")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.with_accuracy:
        result = model_zoo(args.profile, args.device, args.data_dir, args.out_dir, dataset=args.dataset,
                           speed_devices=devices)
        print(result.markdown())
        return
    budget = None if args.budget == 0 else args.budget
    if args.budget is None:
        budget = modern_vit_profile(args.dataset, args.profile).speed_budget_s
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
