"""Training methods: what one training step computes, as small objects the
Trainer calls, registered by name (docs/benchmark.md, "Methods").

A method gets ``setup(model, trainer)`` once, then ``training_step(model,
batch, ctx)`` for every micro-batch; it must leave its gradients in ``p.grad``
through ``ctx.backward(loss)`` or ``ctx.accumulate(grads)`` (which apply the
gradient-accumulation scale) and return a dict of floats to log, with
``"loss"``. Its ``state_dict`` (generators, estimates) goes into checkpoints.
A new method subclasses :class:`Method`, decorates itself with
``@register_method("name")`` and is then usable as ``method="name[opt=value]"``
by the Trainer, ``compare`` and the CLI.
"""

import inspect
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.missing import random_present
from ..models.base import pool
from . import distributed

METHODS = {}


def register_method(name):
    def decorate(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return decorate


_BOOL_WORDS = {"true": True, "on": True, "yes": True, "false": False, "off": False, "no": False}


def _parse_value(text):
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


_SPEC = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\[(.*)\])?\s*$")


def parse_method(spec):
    """``"moddrop[p=0.3]"`` -> ``("moddrop", {"p": 0.3})``."""
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if not match:
        raise ValueError(f"method: expected NAME or NAME[key=value,...], got {spec!r}")
    name, body = match.group(1), match.group(2)
    options = {}
    for item in filter(str.strip, (body or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"method: option {item.strip()!r} in {spec!r} is not key=value")
        options[key.strip()] = _parse_value(value)
    return name, options


def split_methods(text):
    """``"erm,moddrop[p=0.3,x=1]"`` -> ``["erm", "moddrop[p=0.3,x=1]"]`` (commas inside [] stay)."""
    return [part.strip() for part in re.split(r",(?![^\[]*\])", text) if part.strip()]


def build_method(spec):
    name, options = parse_method(spec)
    if name not in METHODS:
        raise ValueError(f"method: unknown {name!r}; expected one of {', '.join(sorted(METHODS))}")
    accepted = inspect.signature(METHODS[name].__init__).parameters
    for key, value in options.items():
        if key not in accepted or key == "self":
            raise ValueError(f"method: {name} has no option {key!r}; its options: "
                             f"{', '.join(k for k in accepted if k != 'self') or 'none'}")
        # an option whose default is a bool also takes on/off/yes/no; "off" stays a word elsewhere
        if isinstance(accepted[key].default, bool) and isinstance(value, str):
            if value.lower() not in _BOOL_WORDS:
                raise ValueError(f"method: {name} option {key!r} expects a bool (true/false/on/off), got {value!r}")
            options[key] = _BOOL_WORDS[value.lower()]
    return METHODS[name](**options)


@dataclass
class StepContext:
    """What a method's step may use: the trainable parameters, the scale of this
    micro-batch in the accumulated gradient, and where training stands."""

    params: list
    loss_scale: float
    step: int
    epoch: int
    epochs: int
    rec_weight: float = 0.0
    rows: slice | None = None  # this rank's rows of the micro-batch all ranks share (None: all)
    global_rows: int | None = None  # that micro-batch's size (None: this rank's batch is all of it)

    @property
    def rank_weight(self):
        """This rank's share of the micro-batch (1 in a single process)."""
        return 1.0 if self.global_rows is None else (self.rows.stop - self.rows.start) / self.global_rows

    def batch_rows(self, local):
        """(size of the global micro-batch, slice of this rank's ``local`` rows in it)."""
        if self.global_rows is None:
            return local, slice(0, local)
        return self.global_rows, self.rows

    def gather_rows(self, x):
        """The global micro-batch's rows of ``x`` (:func:`distributed.gather_rows`), for a
        statistic over the samples inside a loss differentiated with :meth:`grads` (gradients
        that are weighted by ``rank_weight`` when the ranks' gradients are combined)."""
        return distributed.gather_rows(x, self.rank_weight)

    def reduce_mean(self, tensors):
        """For methods with ``reduces_gradients = True``: the batch mean over all ranks of
        per-rank batch means (weighted by each rank's share), in place; a no-op in one process.
        Use it on g_c, g_d and a Hutchinson probe before a decision that depends on them."""
        if distributed.is_distributed():
            torch._foreach_mul_(tensors, self.rank_weight)
            distributed.all_reduce_sum(tensors)
        return tensors

    def backward(self, loss):
        (loss * self.loss_scale).backward()

    def grads(self, loss, **kwargs):
        """Gradients of ``loss`` for ``params`` (zeros where unused), unscaled."""
        grads = torch.autograd.grad(loss, self.params, allow_unused=True, **kwargs)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]

    def accumulate(self, grads):
        """Adds ``loss_scale * grads`` into ``p.grad`` (the one place gradients land)."""
        for p, g in zip(self.params, grads):
            g = g.detach() * self.loss_scale
            p.grad = g if p.grad is None else p.grad.add_(g)


@dataclass
class Forward:
    embeddings: dict
    present: torch.Tensor
    joint: torch.Tensor
    logits: torch.Tensor
    loss: torch.Tensor


def forward(model, batch, present=None, rec_weight=0.0):
    """The supervised forward pass: cross-entropy, plus ``rec_weight`` times the
    reconstruction error of each modality's pooled embedding for models that decode."""
    embeddings = model.encode(batch)
    present = model.all_present(batch) if present is None else present
    joint = model.fuse(embeddings, present, batch.masks)
    logits = model.head(joint)
    loss = F.cross_entropy(logits.float(), batch.labels)
    if rec_weight and getattr(model, "decodes", False):
        decoded = model.decode(joint)
        loss = loss + rec_weight * sum(
            F.mse_loss(decoded[m].float(), pool(embeddings[m], batch.masks.get(m)).detach().float())
            for m in model.modalities)
    return Forward(embeddings, present, joint, logits, loss)


class Method:
    name = None
    reduces_gradients = False  # True: the method combines the ranks' gradients itself (ctx.reduce_mean)

    def setup(self, model, trainer):
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(trainer.config.seed + 7919)

    def training_step(self, model, batch, ctx):
        raise NotImplementedError

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


@register_method("erm")
class ERM(Method):
    """Plain training on complete samples."""

    def training_step(self, model, batch, ctx):
        out = forward(model, batch, rec_weight=ctx.rec_weight)
        ctx.backward(out.loss)
        return {"loss": out.loss.item()}


@register_method("moddrop")
class ModDrop(Method):
    """Each modality of each training sample removed with probability ``p``
    (at least one kept), the model's missing-modality handling standing in."""

    def __init__(self, p=0.5):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"method: moddrop option p must be a probability in [0, 1), got {p!r}")
        self.p = float(p)

    def training_step(self, model, batch, ctx):
        present = random_present(len(batch), len(model.modalities), self.p, self.generator, batch.labels.device)
        out = forward(model, batch, present, rec_weight=ctx.rec_weight)
        ctx.backward(out.loss)
        return {"loss": out.loss.item(), "kept_fraction": present.float().mean().item()}


def ogm_coefficients(scores, alpha):
    """OGM's modulation coefficients for M modalities (docs/benchmark.md): with
    ``rho_m = s_m / mean_{j != m} s_j``, ``k_m = 1 - tanh(alpha * rho_m)`` when
    ``rho_m > 1`` (the modality leads the others), else 1. For M = 2 this is
    Peng et al.'s rule."""
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
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"method: ogm_ge option alpha must be a number >= 0, got {alpha!r}")
        if not isinstance(ge, bool):
            raise ValueError(f"method: ogm_ge option ge must be true or false, got {ge!r}")
        self.alpha, self.ge, self.start_epoch, self.end_epoch = float(alpha), ge, int(start_epoch), int(end_epoch)

    def setup(self, model, trainer):
        super().setup(model, trainer)
        if not hasattr(model, "modality_parameters"):
            raise TypeError("model: ogm_ge needs model.modality_parameters(name) (the encoder of each modality)")
        position = {id(p): i for i, p in enumerate(trainer.params)}
        self.groups = [[position[id(p)] for p in model.modality_parameters(m) if id(p) in position]
                       for m in model.modalities]

    def unimodal_scores(self, model, out, batch):
        """Per modality: the summed probability of the true class with only that modality present."""
        embeddings = {k: v.detach() for k, v in out.embeddings.items()}
        scores = []
        with torch.no_grad():
            for i in range(len(model.modalities)):
                present = torch.zeros_like(out.present)
                present[:, i] = True
                probs = model.head(model.fuse(embeddings, present, batch.masks)).float().softmax(-1)
                scores.append(probs.gather(1, batch.labels[:, None]).sum().item())
        return distributed.sum_floats(scores)  # the whole batch's scores under torchrun

    def training_step(self, model, batch, ctx):
        out = forward(model, batch, rec_weight=ctx.rec_weight)
        coefficients = ogm_coefficients(self.unimodal_scores(model, out, batch), self.alpha)
        grads = ctx.grads(out.loss)
        if ctx.epoch >= self.start_epoch and (self.end_epoch < 0 or ctx.epoch <= self.end_epoch):
            for coefficient, group in zip(coefficients.tolist(), self.groups):
                for i in group:
                    g = grads[i] * coefficient
                    if self.ge and g.ndim >= 2:
                        noise = torch.randn(g.shape, generator=self.generator, device=g.device, dtype=g.dtype)
                        g = g + noise * (grads[i].std() + 1e-8)
                    grads[i] = g
        ctx.accumulate(grads)
        logs = {"loss": out.loss.item()}
        logs.update({f"ogm_coeff/{m}": c for m, c in zip(model.modalities, coefficients.tolist())})
        return logs
