"""Test accuracy of a published checkpoint on a seeded subset of rotated MNIST, with its Wilson 95% interval.

    python scripts/checkpoint_accuracy.py gevit_p4sa_patch5_rotmnist --digits 22000
    python scripts/checkpoint_accuracy.py gevit_p4msa_patch5_rotmnist --classes 3 8 --digits 3700

The subset is ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:digits]`` of the test split
(after ``--classes`` keeps those labels), so a larger ``--digits`` extends a smaller run's subset. Counts are
saved per chunk in ``--out`` (JSON), so an interrupted run resumes where it stopped. docs/published_checkpoints.md
reports what this printed.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from gevit_lib.data import rotated_mnist
from gevit_lib.models import load_published
from gevit_lib.train import evaluate


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (3 lines; not worth a scipy/statsmodels dependency)."""
    p = correct / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a published checkpoint name (docs/published_checkpoints.md)")
    parser.add_argument("--digits", type=int, required=True, help="size of the seeded test subset")
    parser.add_argument("--classes", type=int, nargs="*", default=None, help="keep these labels (3 8 for p4m)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=1000, help="digits per saved chunk")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--transpose", action="store_true", help="undo the digits' transpose (docs/mnist_rot.md)")
    parser.add_argument("--out", type=Path, default=None, help="JSON of per-chunk counts (default: runs/...)")
    args = parser.parse_args()

    test = rotated_mnist("test", digits=args.classes, transform=(lambda x: x.transpose(-1, -2)) if args.transpose else None)
    if not 0 < args.digits <= len(test):
        raise SystemExit(f"--digits must be in 1..{len(test)} (the test split here), got {args.digits}")
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:args.digits].tolist()
    out = args.out or Path("runs") / "checkpoint_accuracy" / f"{args.checkpoint}_seed{args.seed}{'_T' * args.transpose}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    key = {"checkpoint": args.checkpoint, "classes": args.classes, "seed": args.seed, "chunk": args.chunk,
           "transpose": args.transpose,
           "data": test.source, "split_checksum": test.describe()["split_checksum"]}
    saved = json.loads(out.read_text()) if out.exists() else {"key": key, "chunks": {}}
    if saved["key"] != key:
        raise SystemExit(f"{out} holds counts of another run ({saved['key']}); pass another --out")
    model = load_published(args.checkpoint)
    start = time.time()
    for first in range(0, args.digits, args.chunk):
        subset = Subset(test, order[first:first + args.chunk])
        if saved["chunks"].get(str(first), [0, 0])[1] == len(subset):  # done before (a shorter last chunk is redone)
            continue
        result = evaluate(model, subset, batch_size=args.batch_size)
        saved["chunks"][str(first)] = [round(result["accuracy"] * len(subset)), len(subset)]
        out.write_text(json.dumps(saved, indent=1))
        done = sum(n for _, n in saved["chunks"].values())
        print(f"{done}/{args.digits} digits, {time.time() - start:.0f} s", flush=True)
    counts = [saved["chunks"][str(f)] for f in range(0, args.digits, args.chunk)]
    correct, n = sum(c for c, _ in counts), sum(k for _, k in counts)
    low, high = wilson(correct, n)
    print(f"{args.checkpoint} on {n} {test.source} test digits (seed {args.seed}, classes {args.classes}"
          f"{', transpose undone' if args.transpose else ''}): "
          f"{100 * correct / n:.2f}% ({correct}/{n}), Wilson 95% interval {100 * low:.2f}-{100 * high:.2f} "
          f"(+/- {50 * (high - low):.2f} points)")


if __name__ == "__main__":
    main()
