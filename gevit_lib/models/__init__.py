"""Models and their registry, in the style of timm.

Families: ``gevit``, ``gsa_net`` (:mod:`.gevit`), ``vit`` (:mod:`.vit`), ``patch_gevit``, ``hybrid_gevit``
(:mod:`.hybrid`); every published checkpoint has a name too. ``create_model(name)`` builds an untrained model,
``create_model(name, pretrained=True)`` loads the authors' weights (sha256 verified), ``load_published(name)`` does
the same in eval mode, ``list_models()`` lists the names. Every model has ``forward_features(x)``,
``forward_head(features, pre_logits=False)``, ``get_classifier()`` (pre-logits embedding -> logits) and
``forward_intermediates(x)``, and ``model(x) == model.forward_head(model.forward_features(x))``.
"""

from . import gevit, hybrid, vit  # noqa: F401  (each module registers its names)
from ._registry import create_model, list_models, load_published, published_weights, register_model
from .gevit import build_gevit
from .hybrid import build_hybrid, build_patch_gevit
from .vit import build_vit

# name -> published-weights entry (URL at the original repository's fixed commit, sha256, config)
PUBLISHED = {name: published_weights(name) for name in list_models(pretrained=True)}

__all__ = ["PUBLISHED", "build_gevit", "build_hybrid", "build_patch_gevit", "build_vit", "create_model",
           "list_models", "load_published", "published_weights", "register_model"]
