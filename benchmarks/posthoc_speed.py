"""Speed of post-hoc invariance: images/s of the backbone alone and of each method at T = 4, 8, 16 copies.

Methods run with the default ``max_batch="auto"`` (CPU: chunks of 128 copies); "mean (one forward)" pushes all
B*T copies through the backbone at once. The ideal cost of a post-hoc wrapper is T backbone passes; ``cost / ideal`` = time(wrapper, B images) divided by
T x time(backbone, B images) (1.0 = no overhead beyond the T copies; the target is <= 1.2). Because one batch of
B*T images may run faster per image than T batches of B, the table also gives ``overhead`` = time(wrapper, B
images) / time(backbone, one batch of B*T images): what building the copies and aggregating add. The "original
stack" row times the original code's way of building the copies (a float32 CPU tensor filled angle by angle with
torchvision's rotate, then moved to the device) plus the backbone, for comparison.

    python benchmarks/posthoc_speed.py                      # CPU (and CUDA when available), the post's ViT
    python benchmarks/posthoc_speed.py --device cpu --batch 64 --repeats 7 --out runs/benchmarks/posthoc.json

Timings interleave the candidates and report the fastest of the repeats (after a warm-up), to resist noisy
neighbours on shared machines. On a crowded CPU, ``--clock cpu --threads 1`` measures process CPU time instead of
wall time: the compute each candidate costs, unaffected by time spent descheduled.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from torch import Tensor, nn

from gevit_lib.canonical import Canonicalized
from gevit_lib.models.vit import build_vit
from gevit_lib.posthoc import METHODS, PostHoc

GROUPS = {4: "C4", 8: "D4", 16: "C16"}


def original_stack(images: Tensor, n_rotations: int, flips: bool, device: torch.device) -> Tensor:
    """The original ``get_transforms`` + ``.to(device)`` (for comparison only)."""
    b, c, h, w = images.shape
    cpu = images.cpu()
    copies = [cpu] + [TF.rotate(cpu, i * 360 / n_rotations) for i in range(1, n_rotations)]
    if flips:
        copies += [TF.hflip(x) for x in copies]
    out = torch.empty(b, len(copies), c, h, w)
    for i, x in enumerate(copies):
        out[:, i] = x
    return out.to(device)


def timer(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> float:
    now = time.process_time if clock == "cpu" else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = now()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return now() - t0


def run(device: torch.device, batch: int, repeats: int, transforms: list[int], methods: list[str],
        clock: str = "wall") -> dict:
    torch.manual_seed(0)
    model: nn.Module = build_vit("mnist").to(device).eval()
    x = torch.randn(batch, 1, 28, 28, device=device)
    candidates: dict[str, Callable[[], object]] = {"backbone": lambda: model(x)}
    for t in transforms:
        group = GROUPS[t]
        xt = torch.randn(batch * t, 1, 28, 28, device=device)
        candidates[f"backbone@{t}"] = lambda xt=xt: model(xt)
        for method in methods:
            ph = PostHoc(model, method, group).to(device).eval()
            candidates[f"{method}@{t}"] = lambda ph=ph: ph(x)
        one = PostHoc(model, "mean", group, max_batch=None).to(device).eval()
        candidates[f"mean (one forward)@{t}"] = lambda one=one: one(x)
        flips = group.startswith("D")
        n = t // 2 if flips else t
        candidates[f"original_stack@{t}"] = lambda n=n, flips=flips: model(
            original_stack(x, n, flips, device).flatten(0, 1))
    times: dict[str, list[float]] = {k: [] for k in candidates}
    with torch.inference_mode():
        for fn in candidates.values():  # warm-up (index maps, allocator, kernels)
            fn()
        for _ in range(repeats):
            for name, fn in candidates.items():
                times[name].append(timer(fn, device, clock))
    best = {k: min(v) for k, v in times.items()}
    rows = [{"name": "backbone", "T": 1, "images_per_s": batch / best["backbone"], "cost_over_ideal": 1.0,
             "overhead": 1.0}]
    for t in transforms:
        rows.append({"name": "backbone on B*T", "T": t, "group": GROUPS[t],
                     "images_per_s": batch * t / best[f"backbone@{t}"],
                     "cost_over_ideal": best[f"backbone@{t}"] / (t * best["backbone"]), "overhead": 1.0})
        for method in [*methods, "mean (one forward)", "original_stack"]:
            key = f"{method}@{t}"
            rows.append({"name": method, "T": t, "group": GROUPS[t], "images_per_s": batch / best[key],
                         "cost_over_ideal": best[key] / (t * best["backbone"]),
                         "overhead": best[key] / best[f"backbone@{t}"]})
    return {"device": str(device), "batch": batch, "repeats": repeats, "threads": torch.get_num_threads(),
            "clock": clock,
            "torch": torch.__version__, "rows": rows, "best_seconds": best,
            "all_seconds": {k: v for k, v in times.items()}}


def run_canonical(device: torch.device, batch: int, repeats: int, clock: str = "wall") -> dict:
    """Backbone alone against canonicalized (C4, D4, C8), interleaved, best of ``repeats`` after a warm-up."""
    import torchvision

    torch.manual_seed(0)
    backbones = {"resnet18 (3x64x64)": (torchvision.models.resnet18(num_classes=10), (3, 64, 64)),
                 "post's ViT (1x28x28)": (build_vit("mnist"), (1, 28, 28))}
    candidates: dict[str, Callable[[], object]] = {}
    for name, (model, shape) in backbones.items():
        model = model.to(device).eval()
        x = torch.randn(batch, *shape, device=device)
        candidates[f"{name}|backbone"] = lambda model=model, x=x: model(x)
        for group in ("C4", "D4", "C8"):
            wrapper = Canonicalized(model, group).to(device).eval()
            candidates[f"{name}|{group}"] = lambda wrapper=wrapper, x=x: wrapper(x)
            candidates[f"{name}|{group} net only"] = lambda wrapper=wrapper, x=x: wrapper.net(x)
    times: dict[str, list[float]] = {k: [] for k in candidates}
    with torch.inference_mode():
        for fn in candidates.values():
            fn()
        for _ in range(repeats):
            for key, fn in candidates.items():
                times[key].append(timer(fn, device, clock))
    best = {k: min(v) for k, v in times.items()}
    rows = [{"backbone": k.split("|")[0], "what": k.split("|")[1], "images_per_s": batch / t,
             "ratio": t / best[k.split("|")[0] + "|backbone"]} for k, t in best.items()]
    return {"device": str(device), "batch": batch, "repeats": repeats, "threads": torch.get_num_threads(),
            "clock": clock, "torch": torch.__version__, "rows": rows, "all_seconds": times}


def canonical_table(result: dict) -> str:
    lines = [f"device {result['device']}, batch B={result['batch']}, {result['threads']} threads, {result['clock']} "
             f"clock, best of {result['repeats']}; ratio = time / time(backbone alone)", "",
             "| backbone | what | images/s | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['what']} | {r['images_per_s']:.1f} | {r['ratio']:.2f}x |"
              for r in result["rows"]]
    return "\n".join(lines)


def table(result: dict, transforms: list[int], methods: list[str]) -> str:
    by = {(r["name"], r["T"]): r for r in result["rows"]}
    head = f"device {result['device']}, batch B={result['batch']}, {result['threads']} threads, " \
           f"{result['clock']} clock, best of " \
           f"{result['repeats']}; cells: input images/s (cost / ideal T x backbone(B); overhead vs backbone(B*T))"
    lines = [head, "", "| method | " + " | ".join(f"T={t} ({GROUPS[t]})" for t in transforms) + " |",
             "|---|" + "---|" * len(transforms)]
    backbone = by[("backbone", 1)]["images_per_s"]
    lines.append(f"| backbone alone: {backbone:.0f} images/s | " + " | ".join(
        f"ideal {backbone / t:.0f}" for t in transforms) + " |")
    lines.append("| backbone, one batch of B*T (copies/s) | " + " | ".join(
        f"{by[('backbone on B*T', t)]['images_per_s']:.0f} ({by[('backbone on B*T', t)]['cost_over_ideal']:.2f}x)"
        for t in transforms) + " |")
    for method in [*methods, "mean (one forward)", "original_stack"]:
        cells = [f"{by[(method, t)]['images_per_s']:.1f} ({by[(method, t)]['cost_over_ideal']:.2f}x; "
                 f"{by[(method, t)]['overhead']:.2f}x)" for t in transforms]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (cpu + cuda when available)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transforms", type=int, nargs="+", default=[4, 8, 16], choices=sorted(GROUPS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or process CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--canonical", action="store_true", help="time learned canonicalization instead")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default runs/benchmarks/<mode>.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d != "cuda" or torch.cuda.is_available()]
    results = []
    for d in devices:
        if d == "cuda" and args.clock == "cpu":
            raise SystemExit("--clock cpu measures CPU time; use the wall clock for CUDA")
        if args.canonical:
            result = run_canonical(torch.device(d), args.batch, args.repeats, args.clock)
            print(canonical_table(result), "\n", flush=True)
        else:
            result = run(torch.device(d), args.batch, args.repeats, args.transforms, args.methods, args.clock)
            print(table(result, args.transforms, args.methods), "\n", flush=True)
        results.append(result)
    default = "canonical_speed.json" if args.canonical else "posthoc_speed.json"
    args.out = args.out or Path("runs/benchmarks") / default
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
