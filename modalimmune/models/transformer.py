"""Token-level fusion transformer: every modality becomes tokens (a sequence's
steps, or a vector cut into patches of ``patch`` features), all tokens of all
present modalities attend to each other, and a class token is the joint
representation. A missing modality's tokens are masked out and its learned
"missing" token takes their place."""

import functools
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import ModalImmuneModel

PATTERN_BUCKETS = 4  # at most, of rows of similar length in a multi-pattern fusion pass


def length_buckets(lengths, most=PATTERN_BUCKETS):
    """The sizes of at most ``most`` consecutive buckets of the ascending ``lengths`` (a host sequence of
    ints) that cut each bucket at its longest with the fewest padded tokens, sum(size * longest): a
    dynamic programme over the distinct lengths (a bucket boundary between two equal lengths never helps).
    Returns (sizes, longest), two lists of ints."""
    values, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    if not len(values):
        return [], []
    n, rows = len(values), np.r_[0, np.cumsum(counts)]
    first, end = np.arange(n)[:, None], np.arange(1, n + 1)[None]
    cost = np.where(first < end, values[end - 1] * (rows[end] - rows[first]), np.inf)  # one bucket: first..end-1
    best = np.r_[0.0, np.full(n, np.inf)]  # [i]: the fewest padded tokens of the i shortest lengths so far
    starts, totals = [], []
    for _ in range(min(most, n)):
        total = best[:-1, None] + cost
        starts.append(total.argmin(0))
        best = np.r_[np.inf, total.min(0)]
        totals.append(best[-1])
    ends = [n]
    for start in reversed(starts[: int(np.argmin(totals)) + 1]):  # the fewest buckets that reach the least
        ends.insert(0, int(start[ends[0] - 1]))
    ends = np.array(ends)
    return np.diff(rows[ends]).tolist(), values[ends[1:] - 1].tolist()


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


def _encoder_layer(layer, rows, x, keep):
    """``layer`` (a pre-norm GELU ``nn.TransformerEncoderLayer``) for ``rows``, the first tokens of
    ``x`` (N, L, dim), each attending over the tokens of ``x`` that ``keep`` (N, L) marks: the
    layer's own computation, with queries, feed-forward and dropout for those rows only."""
    attention, dim = layer.self_attn, x.shape[-1]
    normed = layer.norm1(x)
    query = F.linear(normed[:, : rows.shape[1]], attention.in_proj_weight[:dim], attention.in_proj_bias[:dim])
    key, value = F.linear(normed, attention.in_proj_weight[dim:], attention.in_proj_bias[dim:]).chunk(2, -1)
    q, k, v = (t.unflatten(-1, (attention.num_heads, -1)).transpose(1, 2) for t in (query, key, value))
    mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :],
                                           dropout_p=attention.dropout if layer.training else 0.0)
    rows = rows + layer.dropout1(attention.out_proj(mixed.transpose(1, 2).flatten(2)))
    return rows + layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(rows))))))


@functools.lru_cache(maxsize=64)
def _layout(counts, device):
    """Each position's modality (L,) (-1: the class token) and whether it is a missing token (L,), for
    modalities of ``counts`` tokens each: built once per layout and device, so that a fusion pass copies
    nothing from the host (a copy to a GPU from pageable memory waits for the stream)."""
    modality, missing = [-1], [False]
    for i, count in enumerate(counts):
        modality += [i] * (count + 1)
        missing += [False] * count + [True]
    return torch.tensor(modality, device=device), torch.tensor(missing, device=device)


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

    def _tokens(self, embeddings, masks):
        """The sequence every pattern of the batch starts from: (B, L, dim) tokens (the class token, then
        each modality's tokens followed by its "missing" token), (B, L) ``real`` (the token masks; true for
        the class and the missing tokens), and each position's modality (L,) (-1: the class token) and
        whether it is a missing token (L,)."""
        masks = masks or {}
        first = embeddings[self.modalities[0]]
        batch, device = first.shape[0], first.device
        tokens, real = [self.cls.expand(batch, -1, -1).to(first.dtype)], [torch.ones(batch, 1, dtype=torch.bool,
                                                                                      device=device)]
        for i, name in enumerate(self.modalities):
            z = embeddings[name]
            tokens += [z, self.missing[i].to(z.dtype).expand(batch, 1, -1)]
            real += [masks.get(name, torch.ones(z.shape[:2], dtype=torch.bool, device=device)),
                     torch.ones(batch, 1, dtype=torch.bool, device=device)]
        counts = tuple(embeddings[name].shape[1] for name in self.modalities)
        return (torch.cat(tokens, 1), torch.cat(real, 1), *_layout(counts, device))

    @staticmethod
    def _keep(real, present, modality, missing):
        """(..., B, L): the tokens a row attends over under ``present`` (..., B, M): the class token, the
        real tokens of its present modalities, the missing token of each absent one."""
        has = present[..., modality.clamp_min(0)] | (modality < 0)
        return torch.where(missing, ~has, real & has)

    def _readout(self, tokens, keep):
        """The normed class token (N, dim) after the blocks over ``tokens`` (N, L, dim) under ``keep``.
        The readout reads the class token only, so the last block computes that one row: every token's
        key and value, the class token's query and feed-forward (docs/benchmark.md, "Models")."""
        *first, last = self.blocks.layers
        for layer in first:
            tokens = _encoder_layer(layer, tokens, tokens, keep)
        return self.norm(_encoder_layer(last, tokens[:, :1], tokens, keep)[:, 0])

    def fuse(self, embeddings, present, masks=None):
        tokens, real, modality, missing = self._tokens(embeddings, masks)
        return self._readout(tokens, self._keep(real, present, modality, missing))

    def fuse_patterns(self, embeddings, present, masks=None):
        """``fuse`` under P ``present`` masks ((P, B, M)) at once: (P, B, dim). Each row attends only over
        the tokens it keeps, so they are packed to the front of its sequence (the blocks act on each
        token alike, and positions are in the tokens), the rows sorted by that length into at most
        ``PATTERN_BUCKETS`` buckets with the fewest padded tokens (:func:`length_buckets`), and each bucket's
        sequences cut at its longest: a pattern with one view alone costs that view's tokens, not the whole
        sequence (docs/method_training.md, "Cost of a step"). One host read: the rows' lengths."""
        tokens, real, modality, missing = self._tokens(embeddings, masks)
        keep = self._keep(real, present, modality, missing).flatten(0, 1)  # (P * B, L)
        lengths = keep.sum(1)
        order = keep.to(torch.uint8).argsort(dim=1, descending=True, stable=True)  # kept tokens first, in order
        ascending, by_length = lengths.sort(stable=True)
        sizes, longest = length_buckets(ascending.tolist())
        joint = []
        for rows, length in zip(by_length.split(sizes), longest):
            index = order[rows, :length]
            joint.append(self._readout(tokens[(rows % tokens.shape[0])[:, None], index], keep[rows[:, None], index]))
        return torch.cat(joint)[by_length.argsort()].unflatten(0, present.shape[:2])
