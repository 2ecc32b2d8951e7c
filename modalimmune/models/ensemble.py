"""Late-fusion ensemble of unimodal heads: one encoder and one classifier per modality; the
prediction is the mean of the present modalities' log-probabilities (regression: of their
predicted values). A missing modality simply leaves the ensemble, so the model needs no
"missing" embedding. The baseline ``method="ensemble"`` trains every head on its own loss
(docs/benchmark.md, "Methods")."""

import torch
from torch import nn

from .base import ModalImmuneModel
from .late_fusion import ModalityEncoder


class UnimodalEnsemble(ModalImmuneModel):
    def __init__(self, spec, num_outputs, *, embed_dim=64, hidden=128, fused_dim=128, dropout=0.1, decode=False):
        super().__init__(spec)
        if decode:
            raise ValueError("decode: the ensemble model has no joint representation to decode from; expected False")
        self.config = dict(embed_dim=embed_dim, hidden=hidden, fused_dim=fused_dim, dropout=dropout)
        self.regression = num_outputs == 1
        self.encoders = nn.ModuleDict({
            name: ModalityEncoder(s.dim, hidden, embed_dim, dropout, s.is_sequence) for name, s in spec.items()})
        self.heads = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(embed_dim, fused_dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(fused_dim, num_outputs)) for name in spec})

    def encode(self, batch):
        return {name: enc(batch.inputs[name], batch.masks.get(name)) for name, enc in self.encoders.items()}

    def fuse(self, embeddings, present, masks=None):
        """The joint "representation" is the ensemble's prediction: (B, num_outputs)."""
        outputs = torch.stack([self.heads[name](embeddings[name]).float() for name in self.modalities], 1)
        if not self.regression:
            outputs = outputs.log_softmax(-1)
        weights = present.to(outputs.dtype)[..., None]
        return (outputs * weights).sum(1) / weights.sum(1).clamp_min(1)

    def head(self, joint):
        return joint
