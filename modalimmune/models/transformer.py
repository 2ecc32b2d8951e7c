"""Token-level fusion transformer: every modality becomes tokens (a sequence's
steps, or a vector cut into patches of ``patch`` features), all tokens of all
present modalities attend to each other, and a class token is the joint
representation. A missing modality's tokens are masked out and its learned
"missing" token takes their place."""

import math

import torch
from torch import nn

from .base import ModalImmuneModel


class _Tokenizer(nn.Module):
    def __init__(self, spec, dim, patch):
        super().__init__()
        self.sequence = spec.is_sequence
        self.patch = patch
        width = spec.dim if self.sequence else patch
        count = spec.max_len if self.sequence else math.ceil(spec.dim / patch)
        self.pad = 0 if self.sequence else count * patch - spec.dim
        self.proj = nn.Linear(width, dim)
        self.position = nn.Parameter(torch.zeros(count, dim))
        self.modality = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, x):
        if not self.sequence:
            x = nn.functional.pad(x, (0, self.pad)).unflatten(-1, (-1, self.patch))
        return self.proj(x) + self.position[: x.shape[1]] + self.modality


class FusionTransformer(ModalImmuneModel):
    def __init__(self, spec, num_classes, *, dim=64, depth=2, heads=4, patch=16, dropout=0.1, decode=False):
        super().__init__(spec)
        self.config = dict(dim=dim, depth=depth, heads=heads, patch=patch, dropout=dropout, decode=decode)
        self.encoders = nn.ModuleDict({name: _Tokenizer(s, dim, patch) for name, s in spec.items()})
        self.missing = nn.Parameter(torch.zeros(len(spec), dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.missing, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.build_heads(dim, num_classes, dim, decode)

    def encode(self, batch):
        return {name: tok(batch.inputs[name]) for name, tok in self.encoders.items()}

    def fuse(self, embeddings, present, masks=None):
        masks = masks or {}
        batch = present.shape[0]
        tokens = [self.cls.expand(batch, -1, -1).to(embeddings[self.modalities[0]].dtype)]
        keep = [torch.ones(batch, 1, dtype=torch.bool, device=present.device)]
        for i, name in enumerate(self.modalities):
            z = embeddings[name]
            real = masks.get(name, torch.ones(z.shape[:2], dtype=torch.bool, device=z.device))
            tokens += [z, self.missing[i].to(z.dtype).expand(batch, 1, -1)]
            keep += [real & present[:, i, None], ~present[:, i, None]]
        out = self.blocks(torch.cat(tokens, 1), src_key_padding_mask=~torch.cat(keep, 1))
        return self.norm(out[:, 0])
