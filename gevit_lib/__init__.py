"""gevit_lib: the library behind the gevit-companion notebooks (GE-ViT, post-hoc equivariance, fast equivariant ViTs)."""

__version__ = "0.1.0"
