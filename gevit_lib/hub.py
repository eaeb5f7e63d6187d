"""Published weights without any model code: where the files are, fetching them (sha256 verified), loading them.

Each model module declares its :class:`PublishedWeights` and converter and registers them in
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

ORIGINAL_COMMIT = "1cee23428b19af200e497e81bb47ddf2265482b4"
_RAW = f"https://raw.githubusercontent.com/WouterBant/GEVit-DL2-Project/{ORIGINAL_COMMIT}/"


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
    def url(self) -> str:
        return _RAW + self.original_path

    @property
    def remote(self) -> RemoteFile:
        return RemoteFile(f"{self.name}.pt", self.url, self.sha256, "sha256")


def checkpoint_file(weights: PublishedWeights, download: bool = True) -> Path:
    """Local, sha256-verified path of a published file, looked for in ``$GEVIT_CHECKPOINT_DIR``, the data
    directory's ``checkpoints/`` and the data directory, else downloaded into the first of them."""
    env = os.environ.get("GEVIT_CHECKPOINT_DIR")
    dirs = ([Path(env).expanduser()] if env else []) + [data_dir() / "checkpoints", data_dir()]
    return fetch(weights.remote, dirs[0], search=dirs[1:], download=download)


def load_original_state_dict(weights: PublishedWeights, download: bool = True) -> dict[str, torch.Tensor]:
    """The published state dict on CPU, with the ``module.`` prefix of ``DataParallel`` removed."""
    state = torch.load(checkpoint_file(weights, download), map_location="cpu", weights_only=True)
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
