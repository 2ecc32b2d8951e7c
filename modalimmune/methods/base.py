"""The method layer: what one training step computes, as small objects registered
by name (docs/method_training.md, "Methods").

A method is built from a spec (``"moddrop[p=0.3]"``), gets ``setup(model, env)``
once with a :class:`MethodEnv` (the trainable parameters, the device, the seed and a
source of validation batches: nothing of the trainer), then
``training_step(model, batch, ctx)`` for every micro-batch. It leaves its gradients
in ``p.grad`` through ``ctx.backward(loss)`` or ``ctx.accumulate(grads)`` (which
apply the gradient-accumulation scale) and returns a dict of figures to log, with
``"loss"``: 0-dim tensors (read to the host only when a log line is written) or
floats. Its ``state_dict`` (generators, estimates) goes into checkpoints.

A new method subclasses :class:`Method`, decorates itself with
``@register_method("name")`` and is then usable as ``method="name[opt=value]"`` by
the Trainer, ``compare`` and the CLI. Its options are the fields of a frozen
dataclass ``Options`` (validated once, in its ``__post_init__``) or, for a small
method, the keyword arguments of its ``__init__``.
"""

import dataclasses
import inspect
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import distributed
from ..models.base import pool

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
            raise ValueError(f"method: expected key=value options in {spec!r}, got {item.strip()!r}")
        options[key.strip()] = _parse_value(value)
    return name, options


def split_methods(text):
    """``"erm,moddrop[p=0.3,x=1]"`` -> ``["erm", "moddrop[p=0.3,x=1]"]`` (commas inside [] stay)."""
    return [part.strip() for part in re.split(r",(?![^\[]*\])", text) if part.strip()]


def option_defaults(cls):
    """``{option: default}`` of a method class: its ``Options`` fields, else its ``__init__`` keywords."""
    if dataclasses.is_dataclass(getattr(cls, "Options", None)):
        return {f.name: f.default for f in dataclasses.fields(cls.Options)}
    parameters = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in parameters.items() if k != "self"}


def option_label(method, option):
    """The argument name of a method option in errors: ``method moddrop option p``."""
    return f"method {method} option {option}"


def build_method(spec):
    """The method a spec names, its options checked (unknown names and bad values raise)."""
    name, options = parse_method(spec)
    if name not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(sorted(METHODS))}, got {name!r}")
    defaults = option_defaults(METHODS[name])
    for key, value in options.items():
        if key not in defaults:
            raise ValueError(f"method: {name} has no option {key!r}; its options: {', '.join(defaults) or 'none'}")
        # an option whose default is a bool also takes on/off/yes/no; "off" stays a word elsewhere
        if isinstance(defaults[key], bool) and isinstance(value, str):
            if value.lower() not in _BOOL_WORDS:
                raise ValueError(f"{option_label(name, key)}: expected true/false/on/off, got {value!r}")
            options[key] = _BOOL_WORDS[value.lower()]
    return METHODS[name](**options)


TASKS = ("classification", "regression")


@dataclass(frozen=True)
class MethodEnv:
    """What a method is set up with: the trainable parameters (in the order of every gradient
    list), their device, the run's seed, ``validation_batch()``, which returns the next
    validation :class:`~modalimmune.data.Batch` on ``device`` (None: the method gets none), and
    the task (``"classification"`` or ``"regression"``)."""

    params: list
    device: torch.device
    seed: int = 0
    validation_batch: Callable | None = None
    task: str = "classification"


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
        accumulate_grads(self.params, grads, self.loss_scale)


def accumulate_grads(params, grads, scale=1.0):
    """``p.grad += scale * g`` for each pair (``p.grad`` created where None), as ``backward`` would."""
    for p, g in zip(params, grads):
        g = g.detach() * scale
        p.grad = g if p.grad is None else p.grad.add_(g)


@dataclass
class Forward:
    embeddings: dict
    present: torch.Tensor
    joint: torch.Tensor
    logits: torch.Tensor
    loss: torch.Tensor


def task_loss(outputs, labels, reduction="mean"):
    """The supervised loss: cross-entropy for class labels, the mean squared error for regression
    targets (float labels; the model has one output); ``reduction="none"``: per sample."""
    if labels.is_floating_point():
        return F.mse_loss(outputs.float().squeeze(-1), labels.float(), reduction=reduction)
    return F.cross_entropy(outputs.float(), labels, reduction=reduction)


def distillation_loss(teacher, student):
    """How far the ``student`` prediction is from the stop-gradient ``teacher`` one, averaged over the
    batch: KL(sg p_teacher || p_student) from class logits, or half the squared difference of predicted
    values (regression: the KL of unit-variance Gaussians). Its gradient moves the student only."""
    teacher, student = teacher.detach().float(), student.float()
    if student.shape[-1] == 1:
        return 0.5 * (teacher - student).square().sum(-1).mean()
    return F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")


def forward(model, batch, present=None, rec_weight=0.0):
    """The supervised forward pass: the task loss, plus ``rec_weight`` times the
    reconstruction error of each modality's pooled embedding for models that decode."""
    embeddings = model.encode(batch)
    present = model.all_present(batch) if present is None else present
    joint = model.fuse(embeddings, present, batch.masks)
    logits = model.head(joint)
    loss = task_loss(logits, batch.labels)
    if rec_weight and getattr(model, "decodes", False):
        decoded = model.decode(joint)
        loss = loss + rec_weight * sum(
            F.mse_loss(decoded[m].float(), pool(embeddings[m], batch.masks.get(m)).detach().float())
            for m in model.modalities)
    return Forward(embeddings, present, joint, logits, loss)


class Method:
    name = None
    reduces_gradients = False  # True: the method combines the ranks' gradients itself (ctx.reduce_mean)
    keep = None  # the modalities a method trains on and is validated on, when fixed (the oracle); None: all
    model = None  # the ready model the method needs (the late-fusion ensemble's), else None: the user's choice

    def kept(self, modalities, device):
        """(M,) bool over ``modalities``: the ones ``keep`` names; None when the method keeps them all."""
        return None if self.keep is None else torch.tensor([m in self.keep for m in modalities], device=device)

    def check(self, modalities, task="classification"):
        """Refuses, before any work, options that cannot serve these modalities or this task (ValueError)."""

    def setup(self, model, env):
        self.generator = torch.Generator(device=env.device).manual_seed(env.seed + 7919)

    def training_step(self, model, batch, ctx):
        raise NotImplementedError

    def finish_step(self, applied):
        """Called once per optimizer step, after its micro-batches: ``applied`` False when the step was
        skipped (a non-finite loss or gradient), and a method then undoes what the step changed in its
        state (estimates, curvature, loss weights; its generators run on)."""

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
