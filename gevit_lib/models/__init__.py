"""Models and their registry, in the style of timm.

Families: GE-ViT / GSA-Nets (``gevit``, ``gsa_net``; :mod:`.gevit`), the post's ViT (``vit``; :mod:`.vit`),
patch-embedding and hybrid models (``patch_gevit``, ``hybrid_gevit``; :mod:`.hybrid`). Every published checkpoint
has a name too (``gevit_p4sa_patch5_rotmnist``, ``vit_rotmnist``, ...): ``create_model(name)`` builds its
architecture untrained, ``create_model(name, pretrained=True)`` loads the authors' weights (sha256 verified), and
``load_published(name)`` does the same in eval mode. ``list_models()`` lists the names.

Every model has the same interface: ``forward_features(x)`` (the last feature map, a tensor),
``forward_head(features, pre_logits=False)`` (logits, or the pooled embedding before the classifier),
``get_classifier()`` (embedding -> logits), ``forward_intermediates(x)`` (the list of intermediate features), and
``model(x) == model.forward_head(model.forward_features(x))``.
"""

from . import gevit, hybrid, vit  # noqa: F401  (each module registers its names)
from ._registry import (
    ModelEntry,
    create_model,
    list_models,
    load_published,
    published_weights,
    register_model,
)
from .gevit import build_gevit
from .hybrid import build_hybrid, build_patch_gevit
from .vit import build_vit

# name -> published-weights entry (URL at the original repository's fixed commit, sha256, config)
PUBLISHED = {w.name: w for w in (*gevit.PUBLISHED_WEIGHTS, *vit.PUBLISHED_WEIGHTS, *hybrid.PUBLISHED_WEIGHTS)}

__all__ = [
    "ModelEntry",
    "PUBLISHED",
    "build_gevit",
    "build_hybrid",
    "build_patch_gevit",
    "build_vit",
    "create_model",
    "list_models",
    "load_published",
    "published_weights",
    "register_model",
]
