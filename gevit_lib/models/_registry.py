"""The model registry behind :mod:`gevit_lib.models` (its own module, so that model files can register themselves
without importing the package that imports them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import Tensor, nn

from ..hub import PublishedWeights, load_original_state_dict

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])
# (builder of the untrained model, published weights or None, converter from the original state dict or None)
Entry = tuple[Callable[..., nn.Module], PublishedWeights | None, Callable[..., nn.Module] | None]
_MODELS: dict[str, Entry] = {}


def register_model(build: Builder, *, name: str | None = None, weights: PublishedWeights | None = None,
                   convert: Callable[..., nn.Module] | None = None) -> Builder:
    """Register ``build`` under ``name`` (default: the weights' name, else the function's); usable as a decorator.
    A published checkpoint comes with ``weights`` and ``convert``, its converter from the original state dict."""
    key = name or (weights.name if weights else build.__name__)
    if key in _MODELS:
        raise ValueError(f"model name {key!r} is already registered")
    if (weights is None) != (convert is None):
        raise ValueError(f"{key}: published weights and their converter come together")
    _MODELS[key] = (build, weights, convert)
    return build


def list_models(pretrained: bool | None = None) -> list[str]:
    """Registered names, sorted: all (``None``), those with published weights (``True``) or the families
    without (``False``)."""
    return sorted(n for n, (_, w, _) in _MODELS.items() if pretrained is None or (w is not None) == pretrained)


def _entry(name: str) -> Entry:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def published_weights(name: str) -> PublishedWeights:
    """The published-weights entry (URL, sha256, config) of a pretrained name."""
    weights = _entry(name)[1]
    if weights is None:
        raise ValueError(f"{name!r} is a model family without published weights; published: "
                         f"{', '.join(list_models(pretrained=True))}")
    return weights


def create_model(name: str, pretrained: bool = False, *, download: bool = True, **overrides: Any) -> nn.Module:
    """A registered model; ``overrides`` replace its builder's options. For a published name, ``pretrained=True``
    loads the published weights (looked up locally, else downloaded when ``download``; sha256 verified)."""
    build, weights, convert = _entry(name)
    options = {**(weights.config if weights else {}), **overrides}
    if not pretrained:
        return build(**options)
    weights = published_weights(name)
    assert convert is not None
    return convert(load_original_state_dict(weights, download), **options)


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
