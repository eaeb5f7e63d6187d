"""Batch entry point for the full-scale runs: ``python -m gevit_lib.run --experiment NAME --profile full``.

Every training the notebooks need at full scale, resumable (``--resume``) and runnable under torchrun, e.g.
``torchrun --nproc-per-node 4 -m gevit_lib.run --experiment gevit_rotmnist --device cuda --resume``.
``--list`` prints the experiments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from .profiles import PROFILES


def _gevit(preset: str, **fixed: Any) -> Callable[[argparse.Namespace], Any]:
    def run(a: argparse.Namespace) -> Any:
        from .experiments.gevit_training import train_gevit

        return train_gevit(preset, fixed.get("group", a.group), a.patch_size, a.profile, device=a.device,
                           data_dir=a.data_dir, run_dir=a.run_dir, resume=a.resume, seed=a.seed,
                           fraction=fixed.get("fraction", 1.0), digits=fixed.get("digits"), compile=a.compile,
                           num_workers=a.num_workers)
    return run


def _posthoc(name: str, checkpoint: str) -> Callable[[argparse.Namespace], Any]:
    def run(a: argparse.Namespace) -> Any:
        notebook = {"rotmnist": "06_posthoc_rotmnist", "mnist_to_rotmnist": "07_posthoc_mnist_to_rotmnist",
                    "low_data": "08_posthoc_low_data", "pcam": "09_posthoc_pcam"}[name]
        raise SystemExit(f"the post-hoc experiments are notebooks now: run notebooks/{notebook}.ipynb "
                         f"(e.g. `python -m gevit_lib.reproduce --only {notebook[:2]}`)")
    return run


def _zoo(dataset: str) -> Callable[[argparse.Namespace], Any]:
    def run(a: argparse.Namespace) -> Any:
        from .experiments.modern_vit import model_zoo

        return model_zoo(a.profile, a.device, a.data_dir, a.run_dir, a.seed, dataset=dataset, models=a.models,
                         overrides=_overrides(a.set))
    return run


def _overrides(items: list[str] | None) -> dict[str, Any] | None:
    """``FIELD=VALUE`` pairs, VALUE as JSON (``epochs=12``, ``lr=3e-3``, ``n_test=5000``), else as a string."""
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


EXPERIMENTS: dict[str, tuple[str, Callable[[argparse.Namespace], Any]]] = {
    "gevit_rotmnist": ("GE-ViT on rotated MNIST (--group, --patch-size; post: p4, patch 9, 300 epochs)",
                       _gevit("rotmnist")),
    "gevit_rotmnist_10pct": ("GE-ViT on 10% of rotated MNIST", _gevit("rotmnist", fraction=0.1)),
    "gevit_rotmnist_3v8": ("GE-ViT p4m on rotated MNIST 3 vs 8", _gevit("rotmnist", group="p4m", digits=(3, 8))),
    "gevit_pcam": ("GE-ViT on PCam (post: p4, patch 5, 100 epochs)", _gevit("pcam")),
    "vit_rotmnist": ("train the post's ViT on rotated MNIST, then every post-hoc method",
                     _posthoc("rotmnist", "train")),
    "vit_mnist": ("train the post's ViT on upright MNIST, then post-hoc on rotated MNIST",
                  _posthoc("mnist_to_rotmnist", "train")),
    "vit_rotmnist_10pct": ("train the post's ViT on 10% of rotated MNIST, then post-hoc",
                           _posthoc("low_data", "train")),
    "posthoc_rotmnist": ("post-hoc experiment 1 from the published checkpoint", _posthoc("rotmnist", "vit_rotmnist")),
    "posthoc_mnist_to_rotmnist": ("post-hoc experiment 2 from the published checkpoint",
                                  _posthoc("mnist_to_rotmnist", "vit_mnist")),
    "posthoc_low_data": ("post-hoc experiment 3 from the published checkpoint",
                         _posthoc("low_data", "vit_rotmnist_10pct")),
    "posthoc_pcam": ("post-hoc experiment 4 (TIAToolbox CNN)", _posthoc("pcam", "")),
    "model_zoo_rotmnist": ("speed / size / accuracy of every equivariant ViT on rotated MNIST (--models, --set)",
                           _zoo("rotmnist")),
    "model_zoo_pcam": ("the same on PCam, with the patch-size ablation (--models, --set)", _zoo("pcam")),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--profile", default="full", choices=PROFILES)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--run-dir", default=None, help="run folder (checkpoints, metrics); reuse it with --resume")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group", default="p4")
    parser.add_argument("--patch-size", type=int, default=9)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on GPUs)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=None, help="model_zoo_*: only these rows (table keys)")
    parser.add_argument("--set", nargs="+", default=None, metavar="FIELD=VALUE",
                        help="model_zoo_*: profile fields to change, e.g. --set epochs=12 n_test=5000")
    args = parser.parse_args(argv)
    if args.list or not args.experiment:
        for name, (text, _) in sorted(EXPERIMENTS.items()):
            print(f"{name:28s} {text}")
        return 0
    result = EXPERIMENTS[args.experiment][1](args)
    if hasattr(result, "rows"):  # model zoo: one line per row
        for row in result.rows:
            print(json.dumps({k: row.get(k) for k in ("key", "params", "val_acc", "test_acc", "epoch_s", "note")}))
        return 0
    summary = getattr(result, "best_val", None), getattr(result, "test", None)
    print(json.dumps({"experiment": args.experiment, "best_val": summary[0], "test": summary[1]}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
