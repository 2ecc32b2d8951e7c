"""Late-fusion MLP: one MLP encoder per modality, a learned "missing" embedding
per modality, the concatenation fused by an MLP."""

import torch
from torch import nn

from .base import ModalImmuneModel, pool


class ModalityEncoder(nn.Module):
    """MLP on a vector, or on each step of a sequence followed by mean and max pooling."""

    def __init__(self, dim, hidden, embed, dropout, sequence):
        super().__init__()
        self.sequence = sequence
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.out = nn.Linear(2 * hidden if sequence else hidden, embed)

    def forward(self, x, mask=None):
        h = self.net(x)
        if self.sequence:
            masked = h.masked_fill(~mask[..., None], float("-inf")) if mask is not None else h
            h = torch.cat([pool(h, mask), masked.amax(1)], dim=-1)
        return self.out(h)


class LateFusionMLP(ModalImmuneModel):
    cheap_patterns = True  # fuse_patterns projects each embedding once; a pattern adds its GELU and head rows

    def __init__(self, spec, num_classes, *, embed_dim=64, hidden=128, fused_dim=128, dropout=0.1, decode=False):
        super().__init__(spec)
        self.config = dict(embed_dim=embed_dim, hidden=hidden, fused_dim=fused_dim, dropout=dropout, decode=decode)
        self.encoders = nn.ModuleDict({
            name: ModalityEncoder(s.dim, hidden, embed_dim, dropout, s.is_sequence) for name, s in spec.items()})
        self.missing = nn.ParameterDict({name: nn.Parameter(torch.zeros(embed_dim)) for name in spec})
        self.fusion = nn.Sequential(nn.Linear(len(spec) * embed_dim, fused_dim), nn.GELU(), nn.Dropout(dropout))
        self.build_heads(fused_dim, num_classes, embed_dim, decode)

    def encode(self, batch):
        return {name: enc(batch.inputs[name], batch.masks.get(name)) for name, enc in self.encoders.items()}

    def fuse(self, embeddings, present, masks=None):
        parts = [torch.where(present[:, i, None], embeddings[name], self.missing[name].to(embeddings[name].dtype))
                 for i, name in enumerate(self.modalities)]
        return self.fusion(torch.cat(parts, dim=-1))

    def fuse_patterns(self, embeddings, present, masks=None):
        """``fuse`` under P ``present`` masks ((P, B, M)) at once: (P, B, fused_dim). The fusion's first
        layer is linear in the concatenation, W [z_1; ...; z_M] = sum_m W_m z_m, so each embedding and
        each "missing" embedding is projected once (one batched matmul over the modalities), and a
        pattern only chooses, per modality, which of the two projections it adds: the P copies of the
        batch never meet W (docs/method_training.md, "Cost of a step")."""
        first = self.fusion[0]
        dtype = embeddings[self.modalities[0]].dtype
        blocks = first.weight.to(dtype).view(first.out_features, len(self.modalities), -1).permute(1, 2, 0)
        projected = torch.bmm(torch.stack([embeddings[name] for name in self.modalities]), blocks)  # (M, B, d)
        missing = torch.bmm(torch.stack([self.missing[name].to(dtype) for name in self.modalities])[:, None], blocks)
        # sum_m (missing_m + present_m (projected_m - missing_m)) + bias
        joint = torch.einsum("pbm,mbd->pbd", present.to(projected.dtype), projected - missing)
        return self.fusion[1:](joint + (missing.sum(0) + first.bias).to(joint.dtype))
