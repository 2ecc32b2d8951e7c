"""The baselines (docs/benchmark.md, "Methods"): plain training (and the per-pattern oracle
``erm[keep=...]``), modality dropout, modality dropout with distillation from the full-input
prediction, the jointly trained late-fusion ensemble of unimodal heads, OGM-GE."""

import torch

from .. import checks, distributed
from ..data.missing import random_present
from .base import Method, distillation_loss, forward, option_label, register_method, task_loss


@register_method("erm")
class ERM(Method):
    """Plain training on complete samples; with ``keep`` ("a+b": modality names joined by ``+``) on
    those modalities alone, the others always missing: the per-pattern oracle of ``compare --oracle``
    (the Trainer then validates on that pattern)."""

    def __init__(self, keep=""):
        label = option_label("erm", "keep")
        if not isinstance(keep, str):
            checks.fail(label, "modality names joined by '+'", repr(keep))
        self.keep = tuple(filter(None, keep.split("+"))) or None

    def check(self, modalities, task="classification"):
        if self.keep is not None and (not set(self.keep) <= set(modalities) or len(set(self.keep)) < len(self.keep)):
            checks.fail(option_label("erm", "keep"), f"distinct names among {', '.join(modalities)} joined by '+'",
                        repr("+".join(self.keep)))

    def training_step(self, model, batch, ctx):
        kept = self.kept(model.modalities, batch.labels.device)
        present = None if kept is None else model.all_present(batch) & kept
        out = forward(model, batch, present, rec_weight=ctx.rec_weight)
        ctx.backward(out.loss)
        return {"loss": out.loss.detach()}


@register_method("moddrop")
class ModDrop(Method):
    """Each modality of each training sample removed with probability ``p``
    (at least one kept), the model's missing-modality handling standing in; a modality
    the sample lacks in the data is not drawn (it is gone already)."""

    def __init__(self, p=0.5):
        self.p = checks.number(option_label("moddrop", "p"), p, 0.0, 1.0, high_open=True)

    def training_step(self, model, batch, ctx):
        present = random_present(len(batch), len(model.modalities), self.p, self.generator, batch.labels.device,
                                 within=batch.present)
        out = forward(model, batch, present, rec_weight=ctx.rec_weight)
        ctx.backward(out.loss)
        return {"loss": out.loss.detach(), "kept_fraction": present.float().mean()}


@register_method("moddrop_kd")
class ModDropDistill(ModDrop):
    """ModDrop with a distillation term: the loss of the full input, the loss of the input with random
    modalities removed (as ``moddrop``), and ``weight`` times KL(sg p(y|x) || p(y|x with them removed)),
    which pulls the prediction without a modality towards the model's own full-input one."""

    def __init__(self, p=0.5, weight=1.0):
        super().__init__(p)
        self.weight = checks.number(option_label("moddrop_kd", "weight"), weight, 0.0)

    def training_step(self, model, batch, ctx):
        present = random_present(len(batch), len(model.modalities), self.p, self.generator, batch.labels.device,
                                 within=batch.present)
        full = forward(model, batch, rec_weight=ctx.rec_weight)
        dropped = model.head(model.fuse(full.embeddings, present, batch.masks))
        distill = distillation_loss(full.logits, dropped)
        loss = full.loss + task_loss(dropped, batch.labels) + self.weight * distill
        ctx.backward(loss)
        return {"loss": loss.detach(), "distill": distill.detach()}


@register_method("ensemble")
class Ensemble(Method):
    """The late-fusion ensemble of unimodal heads trained jointly: on the ``ensemble`` ready model
    (one encoder and head per modality, the prediction the mean over the present ones), each step the
    mean over modalities of each modality's own loss. On another model: each single-modality
    pattern's loss, the same way."""

    model = "ensemble"

    def training_step(self, model, batch, ctx):
        embeddings, present = model.encode(batch), model.all_present(batch)
        loss = 0.0
        for m in range(len(model.modalities)):
            alone = torch.zeros_like(present)
            alone[:, m] = True
            per_sample = task_loss(model.head(model.fuse(embeddings, alone, batch.masks)), batch.labels, "none")
            has = present[:, m].to(per_sample.dtype)  # natural missingness: only the samples that have m count
            loss = loss + (per_sample * has).sum() / has.sum().clamp_min(1)
        loss = loss / len(model.modalities)
        ctx.backward(loss)
        return {"loss": loss.detach()}


def ogm_coefficients(scores, alpha):
    """OGM's modulation coefficients for M modalities (docs/benchmark.md): with
    ``rho_m = s_m / mean_{j != m} s_j``, ``k_m = 1 - tanh(alpha * rho_m)`` when
    ``rho_m > 1`` (the modality leads the others), else 1. For M = 2 this is
    Peng et al.'s rule. ``scores``: a tensor (its device is kept) or a sequence."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    others = (scores.sum() - scores) / (len(scores) - 1)
    ratio = scores / others.clamp_min(1e-12)
    return torch.where(ratio > 1, 1 - torch.tanh(alpha * ratio), torch.ones_like(ratio))


@register_method("ogm_ge")
class OGMGE(Method):
    """On-the-fly gradient modulation with generalisation enhancement (Peng et al.,
    CVPR 2022), generalised to M modalities: the encoder gradients of a modality
    that predicts better on its own than the others are scaled down, and Gaussian
    noise with the gradient's own standard deviation is added (GE)."""

    def __init__(self, alpha=0.5, ge=True, start_epoch=0, end_epoch=-1):
        self.alpha = checks.number(option_label("ogm_ge", "alpha"), alpha, 0.0)
        self.ge = checks.flag(option_label("ogm_ge", "ge"), ge)
        self.start_epoch = checks.integer(option_label("ogm_ge", "start_epoch"), start_epoch, 0)
        self.end_epoch = checks.integer(option_label("ogm_ge", "end_epoch"), end_epoch, -1)

    def check(self, modalities, task="classification"):
        if task != "classification":
            checks.fail("method ogm_ge", "a classification task (its scores are probabilities of the true class)",
                        repr(task))

    def setup(self, model, env):
        super().setup(model, env)
        if not hasattr(model, "modality_parameters"):
            raise TypeError("model: ogm_ge needs model.modality_parameters(name) (the encoder of each modality)")
        position = {id(p): i for i, p in enumerate(env.params)}
        self.groups = [[position[id(p)] for p in model.modality_parameters(m) if id(p) in position]
                       for m in model.modalities]

    def unimodal_scores(self, model, out, batch):
        """Per modality: the summed probability of the true class with only that modality present
        (a float64 tensor on the batch's device; the whole batch's under torchrun)."""
        embeddings = {k: v.detach() for k, v in out.embeddings.items()}
        scores = []
        with torch.no_grad():
            for i in range(len(model.modalities)):
                present = torch.zeros_like(out.present)
                present[:, i] = True
                probs = model.head(model.fuse(embeddings, present, batch.masks)).float().softmax(-1)
                scores.append(probs.gather(1, batch.labels[:, None]).sum())
        return distributed.all_reduce_sum(torch.stack(scores).double())

    def training_step(self, model, batch, ctx):
        out = forward(model, batch, rec_weight=ctx.rec_weight)
        coefficients = ogm_coefficients(self.unimodal_scores(model, out, batch), self.alpha)
        grads = ctx.grads(out.loss)
        if ctx.epoch >= self.start_epoch and (self.end_epoch < 0 or ctx.epoch <= self.end_epoch):
            for coefficient, group in zip(coefficients.unbind(), self.groups):
                for i in group:
                    g = grads[i] * coefficient.to(grads[i].dtype)
                    if self.ge and g.ndim >= 2:
                        noise = torch.randn(g.shape, generator=self.generator, device=g.device, dtype=g.dtype)
                        g = g + noise * (grads[i].std() + 1e-8)
                    grads[i] = g
        ctx.accumulate(grads)
        logs = {"loss": out.loss.detach()}
        logs.update({f"ogm_coeff/{m}": c for m, c in zip(model.modalities, coefficients.unbind())})
        return logs
