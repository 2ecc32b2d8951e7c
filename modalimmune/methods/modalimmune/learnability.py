"""Learnability of missing patterns (docs/method_training.md, "Controller").

For a missing pattern (the modalities of a target set S removed) the learnability is

    a_S = grad L_S(train) . grad L_S(val),

the first-order drop of the held-out loss on S that one gradient step on the training batch
with S removed would buy (per unit of learning rate). A pattern the model has learned as far as
its information allows has a held-out gradient that training no longer moves, so a_S falls towards
0 (or below, when training on S only fits noise); a pattern that is still learnable keeps a large
a_S. The gradients are those of the head given the joint representation of each pattern (one
stacked fusion pass without gradient, then the head's per-pattern gradients at once,
``torch.func.vmap``), or with ``through_fusion`` those of the fusion and the head, the fusion
vectorised over the patterns' ``present`` masks (the encoders' embeddings fixed); in eval mode
(docs/method.md, "Learnability").
"""

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ...models.base import eval_mode, fuse_patterns, math_attention
from ..base import task_loss


class _ModelCall(nn.Module):
    """``call(model, *inputs)`` as a module call, so that ``functional_call`` can swap the parameters."""

    def __init__(self, model, call):
        super().__init__()
        self.model, self.call = model, call

    def forward(self, *inputs):
        return self.call(self.model, *inputs)


def head_parameters(model, params, views):
    """The parameters of ``params`` that ``model.head`` uses, found by differentiating it at the joint
    representation of ``views`` (in eval mode: no dropout draw, so finding them changes no random stream)."""
    with eval_mode(model):
        with torch.no_grad():
            joint = model.fuse(views.embeddings, views.present, views.masks)
        with torch.enable_grad():
            grads = torch.autograd.grad(model.head(joint).float().sum(), params, allow_unused=True)
    return [p for p, g in zip(params, grads) if g is not None]


def pattern_representations(model, embeddings, present, masks, kept):
    """(P, B, d_h): the joint representation of the batch (``embeddings``, ``present``, ``masks``: a
    dict, possibly empty) under each pattern of ``kept`` ((P, M) bool, the modalities each keeps,
    within what the data has), in one :func:`fuse_patterns` pass; differentiable (the measurements
    call it under ``torch.no_grad``)."""
    return fuse_patterns(model, embeddings, present[None] & kept[:, None], masks)


def pattern_gradients(model, params, views, labels, kept, through_fusion=False):
    """(P, n) float32: for each pattern of ``kept``, the gradient over ``params`` of the task loss of
    ``views`` with only that pattern's modalities present, flattened. ``params``: the head's, from the
    stacked joint representations; with ``through_fusion``, the fusion's and the head's, the fusion
    vectorised over the patterns' ``present`` masks (``vmap``)."""
    names = {id(p): f"model.{n}" for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    if through_fusion:  # varied per pattern: the present mask; fixed: the embeddings and the masks
        net = _ModelCall(model, lambda m, present, embeddings, masks: m.head(m.fuse(embeddings, present, masks)))
        inputs = views.present[None] & kept[:, None]
        fixed = ({k: z.detach() for k, z in views.embeddings.items()}, views.masks)
    else:  # varied per pattern: the joint representation
        net, fixed = _ModelCall(model, lambda m, joint: m.head(joint)), ()
        with torch.no_grad():
            inputs = pattern_representations(model, views.embeddings, views.present, views.masks, kept)

    def loss(values, varied):
        return task_loss(functional_call(net, dict(zip(keys, values)), (varied, *fixed)), labels)
    with math_attention():
        grads = vmap(grad(loss), in_dims=(None, 0))(tuple(p.detach() for p in params), inputs)
    return torch.cat([g.float().flatten(1) for g in grads], 1)


def learnability(model, params, train, validation, kept, through_fusion=False):
    """a_S for each pattern of ``kept`` (float64, (P,)): ``train`` and ``validation`` are
    ``(views, labels)`` pairs; ``params`` the head's (:func:`head_parameters`) or, ``through_fusion``,
    the fusion's and the head's."""
    with eval_mode(model):
        g_train = pattern_gradients(model, params, *train, kept, through_fusion)
        g_val = pattern_gradients(model, params, *validation, kept, through_fusion)
    return (g_train.double() * g_val.double()).sum(1).cpu()
