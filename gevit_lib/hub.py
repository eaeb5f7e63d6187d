"""Published weights without any model code: where the files are, fetching them (sha256 verified), loading them.

A :class:`PublishedWeights` entry names one file of the original repository at a fixed commit and its sha256. The
file is looked for in the folders of :func:`checkpoint_dirs` (``$GEVIT_CHECKPOINT_DIR``, the data directory's
``checkpoints/`` folder and the data directory) and
otherwise downloaded into the first of them. :func:`load_into` loads a converted state dict with an error that
names every key that does not fit. Each model module owns its entries and its converter and registers them in
:mod:`gevit_lib.models`; this module imports no model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import RemoteFile, data_dir, fetch

__all__ = ["ORIGINAL_REPO", "ORIGINAL_COMMIT", "IncompatibleCheckpointError", "PublishedWeights",
           "checkpoint_dirs", "checkpoint_file", "load_original_state_dict", "load_into"]

ORIGINAL_REPO = "WouterBant/GEVit-DL2-Project"
ORIGINAL_COMMIT = "1cee23428b19af200e497e81bb47ddf2265482b4"
_RAW = f"https://raw.githubusercontent.com/{ORIGINAL_REPO}/{ORIGINAL_COMMIT}/"

# A reference folder beside the checkout (searched last, only when it exists).


class IncompatibleCheckpointError(RuntimeError):
    """A state dict does not fit the model it is loaded into."""


@dataclass(frozen=True)
class PublishedWeights:
    """One published checkpoint: its name here, its path in the original repository, sha256, a description and
    the keyword options that build its architecture."""

    name: str
    original_path: str
    sha256: str
    description: str
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"

    @property
    def url(self) -> str:
        return _RAW + self.original_path

    @property
    def remote(self) -> RemoteFile:
        return RemoteFile(self.filename, self.url, self.sha256, "sha256")


def checkpoint_dirs() -> list[Path]:
    """Folders searched for checkpoint files, in order; the first one is where downloads go."""
    env = os.environ.get("GEVIT_CHECKPOINT_DIR")
    base = data_dir()
    return ([Path(env).expanduser()] if env else []) + [base / "checkpoints", base]


def checkpoint_file(weights: PublishedWeights | RemoteFile, download: bool = True) -> Path:
    """Local, sha256-verified path of a published file (downloaded into the first search folder if absent)."""
    remote = weights.remote if isinstance(weights, PublishedWeights) else weights
    dirs = checkpoint_dirs()
    return fetch(remote, dirs[0], search=dirs[1:], download=download)


def load_original_state_dict(weights: PublishedWeights | RemoteFile, download: bool = True) -> dict[str, torch.Tensor]:
    """The published state dict on CPU, with the ``module.`` prefix of ``DataParallel`` removed."""
    state = torch.load(checkpoint_file(weights, download), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and not isinstance(state["state_dict"], torch.Tensor):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> nn.Module:
    """``load_state_dict(strict=True)`` with an error that names every missing and unexpected key and shape clash."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    clashes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
               if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or clashes:
        raise IncompatibleCheckpointError(f"{source} does not fit {type(model).__name__}:\n  missing keys: {missing}\n"
                                          f"  unexpected keys: {unexpected}\n  shape mismatches: {clashes}")
    model.load_state_dict(dict(state), strict=True)
    return model
