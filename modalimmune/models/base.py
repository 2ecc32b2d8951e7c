"""The model contract (docs/benchmark.md, "Models").

A model has named modalities and
- ``encode(batch) -> {name: Z}``, ``Z`` ``(B, d)`` pooled or ``(B, T, d)`` tokens;
- ``fuse(embeddings, present, masks=None) -> H`` ``(B, d_h)``, ``present`` a
  ``(B, M)`` bool mask in ``modalities`` order, ``masks`` the token masks of
  token embeddings (``batch.masks``);
- optionally ``fuse_patterns(embeddings, present, masks=None) -> (P, B, d_h)``, the
  same batch fused under P ``present`` masks ``(P, B, M)`` at once (without it,
  :func:`fuse_patterns` stacks P copies of the batch through ``fuse``), and ``cheap_patterns``
  true where a pattern there costs far less than a ``fuse`` of the batch (ModalImmune's
  ``single_views=auto`` reads it; false when absent);
- ``head(H) -> logits`` and optionally ``decode(H) -> {name: Ẑ}``, the pooled
  embedding of each modality reconstructed from the joint one;
- ``all_present(batch) -> present``: the ``(B, M)`` mask of the batch as it comes,
  which every method and the validation start from (here: the batch's own
  ``present`` when its data lacks modalities, else all true).
"""

import contextlib

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode (no dropout draw) inside the block, back in the mode it was in after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def math_attention():
    """Context in which attention runs its math kernel, the one that ``torch.func`` transforms batch and
    whose backward is itself differentiable: the fused flash and memory-efficient kernels have no
    batching rule (``vmap`` would loop over them) and a backward that a second backward cannot cross."""
    return sdpa_kernel(SDPBackend.MATH)


def fuse_patterns(model, embeddings, present, masks=None):
    """(P, B, d_h): the joint representations of one batch's ``embeddings`` under each of P ``present``
    masks ((P, B, M) bool), by the model's own ``fuse_patterns`` where it has one, else by one ``fuse``
    over the P copies of the batch stacked along it (docs/benchmark.md, "Models")."""
    own = getattr(model, "fuse_patterns", None)
    if own is not None:
        return own(embeddings, present, masks)
    patterns, batch = present.shape[:2]
    repeat = lambda t: t.repeat(patterns, *([1] * (t.dim() - 1)))  # noqa: E731
    joint = model.fuse({k: repeat(z) for k, z in embeddings.items()}, present.flatten(0, 1),
                       {k: repeat(m) for k, m in (masks or {}).items()})
    return joint.unflatten(0, (patterns, batch))


def pool(embedding, mask=None):
    """A pooled ``(B, d)`` embedding: itself, or the mean over the real tokens."""
    if embedding.ndim == 2:
        return embedding
    if mask is None:
        return embedding.mean(1)
    weights = mask.to(embedding.dtype)[..., None]
    return (embedding * weights).sum(1) / weights.sum(1).clamp_min(1)


class ModalImmuneModel(nn.Module):
    """Base class for the ready models; any module with the same methods trains.

    ``self.encoders`` (an ``nn.ModuleDict`` by modality) lets methods that act on
    each modality's parameters (``ogm_ge``) find them; ``self.config`` holds the
    constructor arguments so that a checkpoint can rebuild the model.
    """

    decodes = False
    cheap_patterns = False  # True: fuse_patterns shares the fusion's work across the patterns (module docstring)

    def __init__(self, modalities):
        super().__init__()
        self.modalities = tuple(modalities)

    def encode(self, batch):
        raise NotImplementedError

    def fuse(self, embeddings, present, masks=None):
        raise NotImplementedError

    def build_heads(self, joint_dim, num_classes, embed_dim, decode):
        """A linear classifier on H and, with ``decode``, a linear decoder of each
        modality's pooled embedding (width ``embed_dim``)."""
        self.classifier = nn.Linear(joint_dim, num_classes)
        self.decodes = decode
        if decode:
            self.decoders = nn.ModuleDict({name: nn.Linear(joint_dim, embed_dim) for name in self.modalities})

    def head(self, joint):
        return self.classifier(joint)

    def decode(self, joint):
        if not self.decodes:
            raise NotImplementedError(f"{type(self).__name__} was built without decoders (decode=False)")
        return {name: decoder(joint) for name, decoder in self.decoders.items()}

    def all_present(self, batch):
        if batch.present is not None:  # natural missingness: the data says which modalities each sample has
            return batch.present
        return torch.ones(len(batch), len(self.modalities), dtype=torch.bool, device=batch.labels.device)

    def forward(self, batch, present=None):
        present = self.all_present(batch) if present is None else present
        return self.head(self.fuse(self.encode(batch), present, batch.masks))

    def modality_parameters(self, name):
        return self.encoders[name].parameters()
