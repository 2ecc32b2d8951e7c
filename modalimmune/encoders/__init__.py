"""Encoders: raw modality data -> embeddings, and the on-disk embedding cache (docs/encoders.md).

Importing this package does not import transformers; building a ``MiniLM`` does.
"""

from .base import Encoder
from .cache import cached_embeddings, default_cache_dir
from .minilm import MiniLM

__all__ = ["Encoder", "MiniLM", "cached_embeddings", "default_cache_dir"]
