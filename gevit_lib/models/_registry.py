"""The model registry behind :mod:`gevit_lib.models` (a module of its own so that model files can register
themselves without importing the package that imports them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor, nn

from ..hub import PublishedWeights, load_original_state_dict

__all__ = ["ModelEntry", "register_model", "create_model", "list_models", "load_published", "published_weights",
           "check_batch"]

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelEntry:
    """A registered name: ``build(**options)`` makes the untrained model; with ``weights``, ``convert(state,
    **options)`` makes it from the original state dict, and ``weights.config`` gives the default options."""

    name: str
    build: Callable[..., nn.Module]
    weights: PublishedWeights | None = None
    convert: Callable[..., nn.Module] | None = None

    def options(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        return {**(self.weights.config if self.weights else {}), **overrides}


_MODELS: dict[str, ModelEntry] = {}


def register_model(build: Builder | None = None, *, name: str | None = None, weights: PublishedWeights | None = None,
                   convert: Callable[..., nn.Module] | None = None) -> Any:
    """Register a model builder under ``name`` (default: the function's name); usable as a bare decorator.

    A model family registers its builder (``@register_model def gevit(...)``); a published checkpoint registers
    the builder of its architecture with ``weights`` (name taken from them) and ``convert``, its converter from the
    original state dict.
    """
    def add(fn: Builder) -> Builder:
        key = name or (weights.name if weights else fn.__name__)
        if key in _MODELS:
            raise ValueError(f"model name {key!r} is already registered")
        if (weights is None) != (convert is None):
            raise ValueError(f"{key}: published weights and their converter come together")
        _MODELS[key] = ModelEntry(key, fn, weights, convert)
        return fn

    return add if build is None else add(build)


def _entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def list_models(pretrained: bool | None = None) -> list[str]:
    """Registered names, sorted: all (``None``), those with published weights (``True``) or the families
    without (``False``)."""
    return sorted(n for n, e in _MODELS.items() if pretrained is None or (e.weights is not None) == pretrained)


def published_weights(name: str) -> PublishedWeights:
    """The published-weights entry (URL, sha256, config) of a pretrained name."""
    weights = _entry(name).weights
    if weights is None:
        raise ValueError(f"{name!r} is a model family without published weights; published: "
                         f"{', '.join(list_models(pretrained=True))}")
    return weights


def create_model(name: str, pretrained: bool = False, *, download: bool = True, **overrides: Any) -> nn.Module:
    """A registered model; ``overrides`` replace its builder's options.

    For a published name, ``pretrained=False`` gives its architecture untrained and ``pretrained=True`` loads the
    published weights (looked up locally, else downloaded when ``download``; sha256 verified). Families have no
    weights: ``pretrained=True`` on them is an error.
    """
    entry = _entry(name)
    if not pretrained:
        return entry.build(**entry.options(overrides))
    weights = published_weights(name)
    assert entry.convert is not None
    return entry.convert(load_original_state_dict(weights, download), **entry.options(overrides))


def load_published(name: str, download: bool = True, **options: Any) -> nn.Module:
    """``create_model(name, pretrained=True, ...)`` in eval mode on the CPU, with ``published_name`` set."""
    model = create_model(name, pretrained=True, download=download, **options)
    model.eval()
    model.published_name = name  # type: ignore[assignment]
    return model


def check_batch(x: Tensor, model: nn.Module) -> None:
    """The input checks every model shares: a non-empty batch in the dtype of the model's weights."""
    if x.dim() >= 1 and x.shape[0] == 0:
        raise ValueError(f"{type(model).__name__} got an empty batch (input shape {tuple(x.shape)})")
    weight = next(model.parameters(), None)
    if weight is not None and x.dtype != weight.dtype:
        raise ValueError(f"{type(model).__name__} has {weight.dtype} weights but got a {x.dtype} input: cast the "
                         f"input (x.to({weight.dtype})) or the model (model.to({x.dtype}))")
