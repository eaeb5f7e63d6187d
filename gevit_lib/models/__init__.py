"""Models: GE-ViT / GSA-Nets (``gevit``), the post's ViT (``vit``), patch-embedding and hybrid models (``hybrid``).

Import from the submodules, e.g. ``from gevit_lib.models.gevit import build_gevit``.
"""
