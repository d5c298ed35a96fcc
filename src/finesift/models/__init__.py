"""Model loading: built-in embedded models and local transformers folders."""

from finesift.models.loader import BUILTIN_MODELS, ModelBundle, load_model

__all__ = ["BUILTIN_MODELS", "ModelBundle", "load_model"]
