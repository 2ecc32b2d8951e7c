"""The encoder interface (docs/encoders.md): raw modality data -> embeddings.

An encoder is an ``nn.Module`` with
- ``forward(batch) -> Z``, the pooled ``(B, output_dim)`` embeddings of a batch of raw inputs
  (a list of str for ``inputs == "text"``, an array slice or a list of arrays for ``"array"``);
- optionally ``tokens(batch) -> (Z, mask)``, token embeddings ``(B, T, output_dim)`` and the
  ``(B, T)`` bool mask of the real tokens;
- ``frozen``: no parameter trains and the module stays in eval mode (dropout off), so that its
  embeddings can be computed once and cached (``cached_embeddings``);
- ``fingerprint()``: a stable hash of its kind, ``config()`` and weights, part of the cache key.
"""

import hashlib
import json

import torch
from torch import nn

from .. import checks

INPUT_KINDS = ("text", "array")


class Encoder(nn.Module):
    """Base class of the encoders. A subclass sets ``kind`` and ``inputs``, builds its modules
    after ``super().__init__`` and calls ``self.freeze()`` at the end when built frozen."""

    kind = "encoder"  # names the encoder in its fingerprint and its cache folder
    inputs = "array"  # one of INPUT_KINDS: what a batch holds

    def __init__(self, output_dim, *, batch_size=64):
        super().__init__()
        self.output_dim = checks.integer("output_dim", output_dim, 1)
        self.batch_size = checks.integer("batch_size", batch_size, 1)  # rows per forward in cached_embeddings

    def tokens(self, batch):
        raise NotImplementedError(f"{type(self).__name__} gives pooled embeddings only")

    def config(self):
        """The JSON-serialisable settings that change the embeddings (not the device nor the batch size)."""
        return {}

    @property
    def frozen(self):
        return not any(parameter.requires_grad for parameter in self.parameters())

    def freeze(self):
        """No parameter trains; eval mode from now on (``train()`` keeps it there)."""
        self.requires_grad_(False)
        return self.eval()

    def unfreeze(self):
        """Every parameter trains; ``train()``/``eval()`` act as usual again."""
        self.requires_grad_(True)
        return self

    def train(self, mode=True):
        return super().train(mode and not self.frozen)

    def fingerprint(self):
        """sha256 (hex) of the kind, the config and every tensor of the state dict (name, dtype, shape, bytes)."""
        digest = hashlib.sha256(json.dumps({"kind": self.kind, "config": self.config()}, sort_keys=True).encode())
        for name, tensor in self.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
        return digest.hexdigest()


def check_texts(name, texts, allow_missing=False):
    """``texts`` as a list of str (None allowed where ``allow_missing``); TypeError naming the first bad item."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
        checks.fail(name, "a list of str", type(texts).__name__, TypeError)
    for index, text in enumerate(texts):
        if text is None and not allow_missing:
            checks.fail(f"{name}[{index}]", "a str (a missing text needs allow_missing=True)", "None", TypeError)
        if text is not None and not isinstance(text, str):
            checks.fail(f"{name}[{index}]", "a str or None" if allow_missing else "a str",
                        f"{type(text).__name__} {text!r:.60}", TypeError)
    return list(texts)
