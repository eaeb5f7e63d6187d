"""Command line for the long training runs: ``python -m gevit_lib.run --experiment NAME --profile full``.

Each experiment is a recipe of :mod:`gevit_lib.recipes` trained with ``fit``: resumable (``--resume``) and runnable
under torchrun, e.g. ``torchrun --nproc-per-node 4 -m gevit_lib.run --experiment gevit_rotmnist --device cuda``.
``--list`` prints the experiments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .checkpointing import CheckpointError, ResumeError
from .profiles import PROFILES
from .recipes import RECIPES, SETTINGS, Recipe, augmentation, build_model, get_recipe, load_splits, model_config
from .recipes import train_config as recipe_train_config
from .train import FitResult, NonFiniteLossError, fit, seed_everything

__all__ = ["main", "train"]

NOTEBOOKS = ("The post-hoc studies of a trained ViT and the model zoo are notebooks 06-10, run with papermill, e.g. "
             "`python -m gevit_lib.reproduce --only 06 --profile full`")


def train(recipe: Recipe, *, profile: str = "full", run_dir: str | Path | None = None, resume: bool = False,
          seed: int = 0, device: str = "auto", data_dir: str | None = None, num_workers: int = 0,
          compile: bool = False, progress: bool = True) -> FitResult:
    """Train ``recipe`` (from :func:`gevit_lib.recipes.get_recipe`) with ``fit``; the best validation weights end
    in the run folder's ``best.pt`` (default ``runs/<experiment>[_<group>_p<patch size>]/<profile>``).
    ``compile`` wraps the model in ``torch.compile`` (pays off on GPUs)."""
    if not run_dir:
        args = recipe.model_args
        suffix = f"_{args['group']}_p{args['patch_size']}" if "patch_size" in args else ""
        run_dir = Path("runs") / f"{recipe.name}{suffix}" / profile
    seed_everything(seed)
    train_data, val_data, test_data = load_splits(recipe, data_dir, seed)
    model = build_model(recipe)
    label = f"{recipe.name} ({profile})"
    return fit(torch.compile(model) if compile else model, train_data, val_data,
               recipe_train_config(recipe, seed=seed, device=device, num_workers=num_workers, label=label),
               run_dir=run_dir, resume=resume, augment=augmentation(recipe),
               test_data=test_data, progress=progress, model_config=model_config(recipe))


def _settings(items: list[str] | None) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs, VALUE read as JSON (``epochs=12``, ``lr=3e-3``, ``n_train=null``), else as text
    (then refused by the type check)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        if key in out:
            raise ValueError(f"--set gives {key} twice")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _listing() -> str:
    lines = ["Training experiments (each one run of fit; --group / --patch-size where marked):"]
    for name, r in RECIPES.items():
        opts = f" [{', '.join('--' + o.replace('_', '-') for o in r.options)}]" if r.options else ""
        lines.append(f"  {name:22s} {r.description}{opts}")
    return "\n".join([*lines, NOTEBOOKS])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=_listing(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", metavar="NAME", help="a training experiment (see --list)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--profile", default="full", choices=PROFILES)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--run-dir", default=None, help="run folder (checkpoints, metrics); reuse it with --resume "
                        "(default: runs/<experiment>[_<group>_p<patch>]/<profile>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir (a finished run is "
                        "reported, never retrained or rewritten)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group", default=None, help="GE-ViT group (default: the recipe's, e.g. p4)")
    parser.add_argument("--patch-size", type=int, default=None, help="GE-ViT attention neighbourhood (default: "
                        "the recipe's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on GPUs)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--set", nargs="+", default=None, metavar="FIELD=VALUE",
                        help=f"change recipe fields, e.g. --set epochs=12 n_train=5000; fields: {', '.join(SETTINGS)}")
    return parser


def _recipe(args: argparse.Namespace) -> Recipe:
    """The experiment's recipe with the command line's changes; an option it does not use is an error."""
    if args.experiment not in RECIPES:
        raise ValueError(f"unknown experiment {args.experiment!r}; choose one of {', '.join(RECIPES)} (--list). "
                         f"{NOTEBOOKS}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    options = {"group": args.group, "patch_size": args.patch_size}
    return get_recipe(args.experiment, args.profile, model_changes={k: v for k, v in options.items() if v is not None},
                      **_settings(args.set))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list or not args.experiment:
        print(_listing())
        return 0
    try:
        recipe = _recipe(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        result = train(recipe, profile=args.profile, run_dir=args.run_dir, resume=args.resume, seed=args.seed,
                       device=args.device, data_dir=args.data_dir, num_workers=args.num_workers,
                       compile=args.compile)
    except (CheckpointError, ResumeError, FileExistsError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if distributed.is_main_process():
        val, test = result.best_val or {}, result.test or {}
        print(json.dumps({"experiment": args.experiment, "profile": args.profile, "run_dir": str(result.run_dir),
                          "epochs_completed": result.epochs_completed, "best_epoch": result.best_epoch,
                          "val_accuracy": val.get("accuracy"), "val_loss": val.get("loss"), "n_val": val.get("n"),
                          "test_accuracy": test.get("accuracy"), "test_loss": test.get("loss"),
                          "n_test": test.get("n")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
