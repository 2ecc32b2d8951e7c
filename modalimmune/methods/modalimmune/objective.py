"""The ModalImmune objective (docs/method_training.md, "Objective").

For a batch x and its intervened copy x~ (one or more modalities collapsed):

    L = L_task(x)                                      clean part, gradient g_c
      + l_imm  L_task(x~)                              immunity
      + l_con  KL(sg p(y|x) || p(y|x~))                prediction consistency (default), or
               ||H(x) - H(x~)||^2 / d_h                representation consistency (``consistency="representation"``)
      - l_rank erank(H(x~)) / min(B, d_h)              anti-collapse guard
      + l_rec  sum_m ||D_m(H(x~)) - sg(Z_m)||^2 / d_m  reconstruction (models that decode)

Everything after the first line is the destructive part, gradient g_d. The
squared norms are averaged over the batch. The prediction form moves only the damaged prediction
towards the clean one; the representation form pulls both ways, the clean representation towards
the damaged one too (docs/method.md, "Consistency").
"""

from dataclasses import dataclass

import torch

from ... import checks
from ...models.base import fuse_patterns, pool
from ...ops.effective_rank import effective_rank
from ..base import distillation_loss, task_loss

CONSISTENCIES = ("kl", "representation")
SINGLE_VIEWS = ("all", "one")


def consistency_loss(joint, joint_tilde):
    """||H - H~||^2 / d_h, averaged over the batch."""
    return (joint.float() - joint_tilde.float()).square().sum(-1).mean() / joint.shape[-1]


@dataclass
class SingleViews:
    """The single-view term's rows: the head's ``logits`` of each row with one view alone, its ``labels``
    and its ``weights``; the term is sum(weights * per-row task loss) (:meth:`loss`)."""

    logits: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def of(cls, logits, labels, weights):
        """The rows of the (P * B) ``logits`` of P patterns of a batch, ``weights`` (P, B)."""
        return cls(logits, labels.repeat(weights.shape[0]), weights.flatten())

    def loss(self, logits=None):
        """The term, of these rows' logits or of ``logits`` in their place (the hypergradient's curvature)."""
        logits = self.logits if logits is None else logits
        return (task_loss(logits, self.labels, reduction="none") * self.weights).sum()


def single_view_patterns(present, *, each="all", generator=None):
    """The single-view term's patterns ((P, B, M) ``present`` masks, each row with one of its views alone)
    and their rows' weights ((P, B)): the term is the sum over the modalities m of the task loss with m
    alone present, each over the samples that have m (each view weighs as the clean loss does, as each
    head of the ensemble does), with gradients into the fusion, the head and each encoder (docs/method.md,
    "Single views"). ``each="all"``: every sample with each of its views alone (P = M), each row
    weighted 1 / n_m (n_m rows have m). ``each="one"``: every sample with one of its k_b views alone,
    drawn uniformly (``generator``; P = 1), each row weighted k_b / n_m: the same expectation."""
    checks.choice("each", each, SINGLE_VIEWS)
    counts = present.sum(0).clamp_min(1).float()  # n_m
    if each == "one":
        draw = torch.rand(present.shape, generator=generator, device=present.device).masked_fill(~present, -1)
        alone = torch.zeros_like(present).scatter_(1, draw.argmax(1, keepdim=True), True) & present
        return alone[None], (present.sum(1).float() / (alone.float() @ counts).clamp_min(1))[None]
    alone = torch.eye(present.shape[1], dtype=torch.bool, device=present.device)
    return present[None] & alone[:, None], present.T.float() / counts[:, None]


def single_view_loss(model, views, labels, *, each="all", generator=None):
    """The single-view term by itself (:func:`single_view_patterns`, one :func:`fuse_patterns` pass); the
    step fuses these patterns with the clean and the damaged ones instead (:func:`forward_pair`)."""
    patterns, weights = single_view_patterns(views.present, each=each, generator=generator)
    joint = fuse_patterns(model, views.embeddings, patterns, views.masks)
    return SingleViews.of(model.head(joint.flatten(0, 1)), labels, weights).loss()


def normalised_effective_rank(joint, *, k=None, generator=None):
    """erank(H) / min(B, d_h): RankMe over the top ``k`` singular values (None: min(64, B, d_h)).
    Inside a training step a non-finite entry counts as 0: the step's loss is non-finite then
    anyway, and the step is skipped, so the op's scan of H for NaN (a host sync) is left out."""
    k = None if k is None else min(k, *joint.shape)
    joint = joint.float()
    finite = torch.where(torch.isfinite(joint), joint, torch.zeros((), dtype=joint.dtype, device=joint.device))
    return effective_rank(finite, k=k, generator=generator, check_finite=False) / min(joint.shape)


def reconstruction_loss(decoded, embeddings, masks=None):
    """sum_m ||D_m - sg(pool(Z_m))||^2 / d_m, averaged over the batch."""
    masks = masks or {}
    return sum((decoded[name].float() - pool(z, masks.get(name)).detach().float()).square().mean(-1).mean()
               for name, z in embeddings.items())


@dataclass
class Terms:
    """The pieces of the objective, each a scalar tensor (``reconstruction`` 0 when off)."""

    task: torch.Tensor
    immunity: torch.Tensor
    consistency: torch.Tensor
    erank: torch.Tensor
    reconstruction: torch.Tensor

    def destructive(self, weights, rec_weight=0.0, single=None, single_share=1.0):
        """l_imm L_imm + l_con L_con - l_rank erank + l_rec L_rec [+ l_single (1 - q) L_single]; ``weights`` =
        (l_imm, l_con, l_rank, l_single); ``single``: the single-view term L_single, ``single_share`` its 1 - q."""
        loss = weights[0] * self.immunity + weights[1] * self.consistency - weights[2] * self.erank
        if rec_weight:
            loss = loss + rec_weight * self.reconstruction
        return loss if single is None else loss + weights[3] * single_share * single

    def log(self):
        """Every term as a detached 0-dim tensor (read to the host only when a log line is written)."""
        return {f"term/{k}": v.detach() for k, v in vars(self).items()}


@dataclass
class Outputs:
    """The model outputs the objective is a function of (``pattern_logits``: of more patterns of the clean
    embeddings, (P * B, C), when :func:`forward_pair` is given them)."""

    joint: torch.Tensor
    logits: torch.Tensor
    joint_tilde: torch.Tensor
    logits_tilde: torch.Tensor
    decoded: dict | None = None
    pattern_logits: torch.Tensor | None = None


def forward_pair(model, clean, perturbed, *, decode=False, patterns=None):
    """Fusion and head on the ``clean`` and on the ``perturbed`` :class:`Views` (encoders run once, before)
    and, given ``patterns`` ((P, B, M) ``present`` masks), on the clean embeddings under each. Where the
    perturbed views keep the clean embeddings (removal alone: the defaults' full-strength draws) all are
    one :func:`fuse_patterns` pass and one head pass (docs/method_training.md, "Cost of a step"); where they
    keep them but on the rows ``perturbed.apart`` lists (swapped views), those rows are fused again apart."""
    apart = perturbed.apart
    shared = apart is not None or (
        perturbed.embeddings.keys() == clean.embeddings.keys() and perturbed.masks.keys() == clean.masks.keys()
        and all(perturbed.embeddings[k] is z for k, z in clean.embeddings.items())
        and all(perturbed.masks[k] is m for k, m in clean.masks.items()))
    presents = [clean.present[None]] + ([perturbed.present[None]] if shared else [])
    presents += [] if patterns is None else [patterns]
    joint = fuse_patterns(model, clean.embeddings, torch.cat(presents), clean.masks)
    logits = model.head(joint.flatten(0, 1)).unflatten(0, joint.shape[:2])
    if shared:
        joint_tilde, logits_tilde, rest = joint[1], logits[1], 2
        if apart is not None and len(apart):
            rows = perturbed.apply(lambda t: t[apart])
            joint_apart = model.fuse(rows.embeddings, rows.present, rows.masks)
            joint_tilde = joint_tilde.index_copy(0, apart, joint_apart.to(joint_tilde.dtype))
            logits_tilde = logits_tilde.index_copy(0, apart, model.head(joint_apart).to(logits_tilde.dtype))
    else:
        joint_tilde, rest = model.fuse(perturbed.embeddings, perturbed.present, perturbed.masks), 1
        logits_tilde = model.head(joint_tilde)
    decoded = model.decode(joint_tilde) if decode else None
    return Outputs(joint[0], logits[0], joint_tilde, logits_tilde, decoded,
                   None if patterns is None else logits[rest:].flatten(0, 1))


def objective_terms(outputs, labels, embeddings=None, masks=None, *, erank_k=None, generator=None, erank=None,
                    consistency="kl"):
    """:class:`Terms` of ``outputs``; ``erank`` (the normalised effective rank of H~) is
    computed unless given; the reconstruction needs ``embeddings`` when the outputs decode;
    ``consistency``: one of ``CONSISTENCIES``."""
    if erank is None:
        erank = normalised_effective_rank(outputs.joint_tilde, k=erank_k, generator=generator)
    zero = outputs.logits.new_zeros((), dtype=torch.float32)
    rec = reconstruction_loss(outputs.decoded, embeddings, masks) if outputs.decoded is not None else zero
    return Terms(task_loss(outputs.logits, labels), task_loss(outputs.logits_tilde, labels),
                 distillation_loss(outputs.logits, outputs.logits_tilde) if consistency == "kl" else
                 consistency_loss(outputs.joint, outputs.joint_tilde), erank.float(), rec)
