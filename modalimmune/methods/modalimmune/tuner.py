"""LambdaTuner: the loss weights phi = (log l_imm, log l_con, log l_rank, log l_single) along the certified
implicit hypergradient of a robust validation loss (docs/method_training.md, "Training step",
step 5; docs/hypergrad.md)."""

import math

import torch

from ... import checks
from ...data.missing import random_present
from ...hypergrad import implicit_hypergradient
from ...models.base import eval_mode
from ..base import task_loss
from .objective import (
    Outputs,
    SingleViews,
    forward_pair,
    normalised_effective_rank,
    objective_terms,
    single_view_patterns,
)
from .options import LAMBDA_NAMES, LOG_LAMBDA_RANGE

HYPER_RMS_DECAY = 0.9  # of the running mean square of the hypergradient that scales phi's steps


def fusion_head_parameters(model, params):
    """``params`` without the modality encoders' (``model.modality_parameters``); all when unknown."""
    if not hasattr(model, "modality_parameters"):
        return list(params)
    encoder = {id(p) for m in model.modalities for p in model.modality_parameters(m)}
    return [p for p in params if id(p) not in encoder]


class LambdaTuner:
    """Holds phi and the state of its steps: the running mean square of the hypergradient, the
    warm start of the power iteration, the last solve's figures. ``validation_batch()`` gives the
    next validation batch; each of its samples misses each modality with probability
    ``options.val_drop`` (at least one kept), drawn from ``generator``. With ``hypergrad=off``
    phi keeps its initial value (the tuner never steps) and no validation data is needed. A term
    whose initial weight is 0 is off: its weight stays 0 and its hypergradient is 0."""

    def __init__(self, model, params, options, validation_batch, generator, device):
        if validation_batch is None and options.hypergrad != "off":
            raise ValueError("env.validation_batch: expected a source of validation batches for the "
                             "hypergradient, got None (or use modalimmune[hypergrad=off])")
        self.options, self.validation_batch, self.generator = options, validation_batch, generator
        self.modalities = len(model.modalities)
        self.phi = torch.tensor(options.initial_phi(), dtype=torch.float32, device=device, requires_grad=True)
        self.active = torch.tensor([getattr(options, f"lambda_{n}") > 0 for n in LAMBDA_NAMES], device=device)
        self.mean_square, self.steps = torch.zeros_like(self.phi, requires_grad=False), 0
        self.targets = (fusion_head_parameters(model, params) if options.hyper_params == "fusion_head"
                        else list(params))
        self.power_init = []  # the last solve's top eigenvector: warm start of the next power iteration
        self._before_step = None  # the state before this optimizer step's solve (settle)
        self.log = {"hyper/applied": 0.0, "hyper/certified": 0.0, "hyper/iterations": 0.0,
                    "hyper/residual_ratio": 0.0, "hyper/error_bound": 0.0, "hyper/grad_norm": 0.0,
                    "hyper/damping": 0.0, "hyper/solves": 0.0, "hyper/applied_total": 0.0}

    def weights(self):
        """(l_imm, l_con, l_rank, l_single) = exp(phi), 0 for the terms that are off; differentiable in phi."""
        return torch.where(self.active, self.phi.exp(), torch.zeros((), device=self.phi.device))

    def lambdas(self):
        """:meth:`weights`, detached."""
        return self.weights().detach()

    def lambda_log(self):
        return {f"lambda/{n}": v for n, v in zip(LAMBDA_NAMES, self.lambdas().unbind())}

    def _validation(self):
        """The validation batches of one solve with their random missing patterns."""
        batches = []
        for _ in range(self.options.val_batches):
            batch = self.validation_batch()
            present = random_present(len(batch), self.modalities, self.options.val_drop, self.generator,
                                     batch.labels.device, within=batch.present)
            batches.append((batch, present))
        return batches

    def step(self, model, clean, perturbed, labels, rec_weight=0.0, single_share=0.0):
        """One step of phi along the certified implicit hypergradient. ``clean`` and ``perturbed`` are
        this micro-batch's :class:`Views` (gathered over the ranks: every rank then solves for the
        global micro-batch, so the solves, certificates and steps of phi agree); the embeddings are
        constants, so only the fusion layers and head are differentiated. ``single_share``: the
        single-view term's share of l_single this step, 1 - q (0: the term is not computed). Returns
        (g, certificate), or (None, None) when the step's embeddings or parameters are not finite: that
        step's loss is not finite either, the step is skipped, and there is nothing to solve for."""
        options = self.options
        if not checks.all_finite([*clean.embeddings.values(), *perturbed.embeddings.values(), *self.targets]):
            return None, None
        if self._before_step is None:
            self._before_step = self.state_dict()
        decode = bool(rec_weight) and getattr(model, "decodes", False)
        val = self._validation()
        with torch.no_grad():
            val_embeddings = [{k: v.detach() for k, v in model.encode(b).items()} for b, _ in val]

        ranked = options.lambda_rank > 0  # a guard that is off stays off: no SVD for a weight of 0

        def inner_loss():
            patterns, weights = (single_view_patterns(clean.present, each=options.single_views,
                                                      generator=self.generator) if single_share else (None, None))
            out = forward_pair(model, clean, perturbed, decode=decode, patterns=patterns)
            erank = (normalised_effective_rank(out.joint_tilde, k=options.erank_k, generator=self.generator)
                     if ranked else None)
            single = SingleViews.of(out.pattern_logits, labels, weights) if single_share else None
            optional = [t for t in (erank, single.logits if single else None) if t is not None]
            decoded = list(out.decoded.values()) if decode else []
            outputs = (out.logits, out.logits_tilde, out.joint, out.joint_tilde, *optional, *decoded)

            def loss_of_outputs(o):  # convex in the outputs except erank, where it is linear: GGN stays PSD
                rest = list(o[4:])
                erank_o = rest.pop(0) if ranked else o[0].new_zeros(())
                single_o = rest.pop(0) if single else None
                rebuilt = Outputs(o[2], o[0], o[3], o[1], dict(zip(out.decoded, rest)) if decode else None)
                terms = objective_terms(rebuilt, labels, clean.embeddings, clean.masks, erank=erank_o,
                                        consistency=options.consistency)
                single_loss = single.loss(single_o) if single else None
                return terms.task + terms.destructive(self.weights(), rec_weight, single_loss, single_share)
            return outputs, loss_of_outputs

        def outer_loss():
            return sum(task_loss(model.head(model.fuse(z, p, b.masks)), b.labels)
                       for (b, p), z in zip(val, val_embeddings)) / len(val)

        with eval_mode(model):  # no dropout noise inside the solve
            (g,), cert = implicit_hypergradient(inner_loss, outer_loss, self.targets, [self.phi],
                                                curvature="ggn", damping=options.hyper_damping,
                                                relative_damping=options.hyper_rel_damping, tol=options.hyper_tol,
                                                max_iter=options.hyper_iters, power_iters=options.hyper_power_iters,
                                                power_init=self.power_init or None)
        self.power_init = [t.detach().clone() for t in cert.eigvec] if cert.eigvec else []
        norm = float(g.norm())
        applied = cert.certified and math.isfinite(norm)
        if applied:  # an RMS-normalised step (each log-weight moves at most hyper_max_step)
            self.mean_square.mul_(HYPER_RMS_DECAY).add_((1 - HYPER_RMS_DECAY) * g.square())
            self.steps += 1
            scale = (self.mean_square / (1 - HYPER_RMS_DECAY ** self.steps)).sqrt().clamp_min(1e-12)
            with torch.no_grad():
                step = (options.hyper_lr * g / scale).clamp(-options.hyper_max_step, options.hyper_max_step)
                self.phi.sub_(step).clamp_(*LOG_LAMBDA_RANGE)
        log = self.log
        log.update({"hyper/applied": float(applied), "hyper/certified": float(cert.certified),
                    "hyper/iterations": float(cert.iterations), "hyper/residual_ratio": float(cert.residual_ratio),
                    "hyper/error_bound": float(min(cert.error_bound, 1e30)), "hyper/grad_norm": norm,
                    "hyper/damping": float(cert.damping),
                    "hyper/solves": log["hyper/solves"] + 1,
                    "hyper/applied_total": log["hyper/applied_total"] + applied})
        return g, cert

    def settle(self, applied):
        """End of an optimizer step: keeps its solve's effects (``applied``) or undoes them."""
        before, self._before_step = self._before_step, None
        if not applied and before is not None:
            self.load_state_dict(before)

    def state_dict(self):
        return {"phi": self.phi.detach().clone(), "mean_square": self.mean_square.clone(), "steps": self.steps,
                "log": dict(self.log), "power_init": [t.clone() for t in self.power_init]}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.phi.copy_(state["phi"])
        self.mean_square.copy_(state["mean_square"])
        self.steps = int(state["steps"])
        self.log = {k: float(v) for k, v in state["log"].items()}
        self.power_init = [t.to(self.phi.device) for t in state["power_init"]]
        self._before_step = None
