"""``method="modalimmune"``: the ModalImmune training step (docs/method_training.md, "Training step").

Each micro-batch: encode once; the controller measures each modality's
information gain from the cached embeddings (every ``ig_every`` steps) and
picks targets and strengths (every step); the intervention destroys them; the objective
gives the clean loss and the destructive part; their gradients g_c and g_d
are combined by the curvature mask (Hutchinson probe of the clean loss every
``probe_every`` steps) into ``p.grad``. Every ``hyper_every`` optimizer steps
phi = (log l_imm, log l_con, log l_rank) takes a step along the certified
implicit hypergradient of a validation loss with random missing modalities,
with Gauss-Newton curvature over the fusion layers and the head; an
uncertified hypergradient is logged and not applied.

Ablations (options of the method spec, e.g. ``modalimmune[mask=off]``):
``controller=ig|shapley|uniform``, ``collapse=spectral|zero|fixed_rank``,
``mask=hard|soft|off``, ``hypergrad=neumann|off``, ``joint_targets=false`` (targets drawn per modality).
"""

import math

import torch

from ..data.missing import random_present
from ..hypergrad import implicit_hypergradient
from ..ops import _validate
from ..train import distributed
from ..train.methods import Method, register_method
from .controller import ESTIMATORS, InfoGainController
from .interventions import COLLAPSES, add_noise, collapse, token_dropout
from .masker import CurvatureMasker
from .objective import Outputs, forward_pair, normalised_effective_rank, objective_terms, task_loss

INTERVENTIONS = ("collapse", "remove", "noise", "token_dropout")
MASKS = ("hard", "soft", "off")
HYPERGRADS = ("neumann", "off")
HYPER_PARAMS = ("fusion_head", "all")
LOG_LAMBDA_RANGE = (math.log(1e-3), math.log(10.0))  # phi is kept inside these bounds
LAMBDA_NAMES = ("imm", "con", "rank")
HYPER_RMS_DECAY = 0.9  # of the running mean square of the hypergradient that scales phi's steps


def fusion_head_parameters(model, params):
    """``params`` without the modality encoders' (``model.modality_parameters``); all when unknown."""
    if not hasattr(model, "modality_parameters"):
        return list(params)
    encoder = {id(p) for m in model.modalities for p in model.modality_parameters(m)}
    return [p for p in params if id(p) not in encoder]


def _positive(name, value, integer=False, minimum=1):
    """``value`` checked: an int >= ``minimum`` (``integer``) or a finite number >= 0."""
    if integer and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"method: modalimmune option {name} must be an int >= {minimum}, got {value!r}")
    if not integer:
        try:
            value = _validate.finite_float(name, value, 0.0)
        except (TypeError, ValueError):
            raise ValueError(f"method: modalimmune option {name} must be a finite number >= 0, got {value!r}") from None
    return value


def _flag(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"method: modalimmune option {name} must be true or false, got {value!r}")
    return value


def _option(name, value, options):
    if value not in options:
        raise ValueError(f"method: modalimmune option {name} must be one of {', '.join(options)}, got {value!r}")
    return value


@register_method("modalimmune")
class ModalImmune(Method):
    """Self-destructive training (DESIGN sections 2, 4-7). Every option is a method-spec option.

    Data-parallel: the statistics over a batch's samples (the collapse's SVD, the effective
    rank, the noise power, the per-sample draws) are taken over the global micro-batch, and
    g_c, g_d and the probe are reduced before the mask (docs/distributed.md, "Methods")."""

    reduces_gradients = True

    def __init__(self, controller="ig", collapse="spectral", mask="hard", hypergrad="neumann",
                 intervention="collapse", lambda_imm=3.0, lambda_con=0.1, lambda_rank=0.01,
                 temperature=0.05, epsilon=0.2, s_min=1.0, s_max=1.0, momentum=0.9, max_targets=5, budget=0.0,
                 joint_targets=True, per_sample=False,
                 ig_every=4, ig_samples=16, erank_k=16, quantile=0.9, beta=0.99, probe_every=10,
                 hyper_every=25, hyper_lr=0.1, hyper_max_step=0.5, hyper_damping=1.0, hyper_rel_damping=0.25,
                 hyper_tol=0.05, hyper_iters=50, hyper_power_iters=5, hyper_params="fusion_head", val_drop=0.5,
                 val_batches=1):
        self.controller_kind = _option("controller", controller, ESTIMATORS)
        self.collapse_mode = _option("collapse", collapse, COLLAPSES)
        self.mask = _option("mask", mask, MASKS)
        self.hypergrad = _option("hypergrad", hypergrad, HYPERGRADS)
        self.intervention = _option("intervention", intervention, INTERVENTIONS)
        self.hyper_params = _option("hyper_params", hyper_params, HYPER_PARAMS)
        lambdas = [_positive(f"lambda_{n}", v) for n, v in zip(LAMBDA_NAMES, (lambda_imm, lambda_con, lambda_rank))]
        low, high = LOG_LAMBDA_RANGE
        self.initial_phi = [min(max(math.log(max(v, 1e-30)), low), high) for v in lambdas]
        self.controller_options = dict(temperature=temperature, epsilon=epsilon, s_min=s_min, s_max=s_max,
                                       momentum=momentum, max_targets=max_targets,
                                       budget=budget if budget else None,
                                       joint=_flag("joint_targets", joint_targets))
        self.masker_options = dict(quantile=quantile, beta=beta, probe_every=probe_every, mode=mask)
        self.per_sample = _flag("per_sample", per_sample)
        self.ig_every = _positive("ig_every", ig_every, integer=True)
        self.ig_samples = _positive("ig_samples", ig_samples, integer=True, minimum=0)  # 0: the whole batch
        self.erank_k = _positive("erank_k", erank_k, integer=True)
        self.hyper_every = _positive("hyper_every", hyper_every, integer=True)
        self.hyper_iters = _positive("hyper_iters", hyper_iters, integer=True)
        self.hyper_power_iters = _positive("hyper_power_iters", hyper_power_iters, integer=True)
        self.val_batches = _positive("val_batches", val_batches, integer=True)
        self.hyper_lr, self.hyper_max_step, self.hyper_damping, self.hyper_rel_damping, self.hyper_tol = (
            _positive(n, v) for n, v in (("hyper_lr", hyper_lr), ("hyper_max_step", hyper_max_step),
                                         ("hyper_damping", hyper_damping), ("hyper_rel_damping", hyper_rel_damping),
                                         ("hyper_tol", hyper_tol)))
        if isinstance(val_drop, bool) or not isinstance(val_drop, (int, float)) or not 0 <= val_drop < 1:
            raise ValueError(f"method: modalimmune option val_drop must be in [0, 1), got {val_drop!r}")
        self.val_drop = float(val_drop)

    # -- set-up and state ----------------------------------------------------------------------------
    def setup(self, model, trainer):
        super().setup(model, trainer)
        seed = trainer.config.seed
        self.controller = InfoGainController(model.modalities, estimator=self.controller_kind, seed=seed + 104729,
                                             **self.controller_options)
        self.params = trainer.params
        self.masker = (None if self.mask == "off" else
                       CurvatureMasker(self.params, seed=seed + 15485863, **self.masker_options))
        device = self.params[0].device
        self.phi = torch.tensor(self.initial_phi, dtype=torch.float32, device=device, requires_grad=True)
        self.hyper_sq, self.hyper_count = torch.zeros_like(self.phi, requires_grad=False), 0
        self.hyper_targets = (fusion_head_parameters(model, self.params) if self.hyper_params == "fusion_head"
                              else list(self.params))
        self.dataset, self.batch_size, self.device = trainer.dataset, trainer.config.batch_size, trainer.device
        self.val_seed = seed + 32452843
        self.val_cursor, self.val_pass, self.last_hyper_step = 0, 0, -1
        self.power_init = []  # the last solve's top eigenvector: warm start of the next power iteration
        self.hyper_log = {"hyper/applied": 0.0, "hyper/certified": 0.0, "hyper/iterations": 0.0,
                          "hyper/residual_ratio": 0.0, "hyper/error_bound": 0.0, "hyper/grad_norm": 0.0,
                          "hyper/damping": 0.0, "hyper/solves": 0.0, "hyper/applied_total": 0.0}

    def state_dict(self):
        return {**super().state_dict(), "controller": self.controller.state_dict(), "phi": self.phi.detach().clone(),
                "hyper_sq": self.hyper_sq.clone(), "hyper_count": self.hyper_count,
                "masker": self.masker.state_dict() if self.masker else {},
                "val_cursor": self.val_cursor, "val_pass": self.val_pass,
                "last_hyper_step": self.last_hyper_step, "hyper_log": dict(self.hyper_log),
                "power_init": [t.clone() for t in self.power_init]}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.controller.load_state_dict(state["controller"])
        if self.masker:
            self.masker.load_state_dict(state["masker"])
        with torch.no_grad():
            self.phi.copy_(state["phi"])
        self.hyper_sq.copy_(state["hyper_sq"])
        self.hyper_count = int(state["hyper_count"])
        self.val_cursor, self.val_pass = int(state["val_cursor"]), int(state["val_pass"])
        self.last_hyper_step = int(state["last_hyper_step"])
        self.hyper_log = {k: float(v) for k, v in state["hyper_log"].items()}
        self.power_init = [t.to(self.device) for t in state["power_init"]]

    def lambdas(self):
        return self.phi.detach().exp()

    # -- the intervention ------------------------------------------------------------------------------
    def intervene(self, embeddings, present, masks, strengths, ctx=None):
        """(embeddings, present, masks) of x~: ``strengths`` (B, M) gives each sample's targets and
        their strength (0: untouched). A modality's strength is the controller's s_m for all the
        samples that target it, so the damaged embedding is computed once (for pooled embeddings
        over the whole batch, whose rows are the samples) and kept on the targeted rows. Under
        data parallelism (``ctx``) B is the global micro-batch: the damage is computed on its
        gathered rows and this rank keeps its own."""
        names = self.controller.modalities  # the indices are positions in model.modalities
        embeddings, present, masks = dict(embeddings), present.clone(), dict(masks)
        strengths = torch.as_tensor(strengths, dtype=torch.float64).cpu()
        gather, ours = (ctx.gather_rows, ctx.batch_rows(present.shape[0])[1]) if ctx else (lambda x: x, slice(None))
        targeted_rows = strengths > 0
        everywhere = targeted_rows.all(0).tolist()
        top = strengths.amax(0).tolist()  # of a targeted modality: its targets' strength (the others are <= 0)
        for m in [m for m, hit in enumerate(targeted_rows.any(0).tolist()) if hit]:
            name, strength = names[m], top[m]
            rows = targeted_rows[:, m].to(present.device)
            if self.intervention == "remove" or (self.intervention == "collapse" and strength >= 1):
                present[:, m] &= ~rows[ours]  # s = 1: the modality is gone; the model's own missing handling
                continue
            z = gather(embeddings[name])
            if self.intervention == "collapse":
                damaged = collapse(z, strength, mode=self.collapse_mode, generator=self.generator)
            elif self.intervention == "noise":  # strength s: noise power s / (1 - s) times the signal's
                s = min(max(strength, 1e-6), 1 - 1e-6)
                damaged = add_noise(z, 10 * math.log10((1 - s) / s), generator=self.generator)
            elif z.dim() == 3:  # token dropout at rate s (pooled embeddings: no tokens to drop, left as is)
                real = masks.get(name)
                real = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device) if real is None else gather(real)
                damaged, dropped = token_dropout(z, real, min(strength, 0.99), generator=self.generator)
                masks[name] = torch.where(rows[:, None], dropped, real)[ours]
            else:
                continue
            damaged = damaged if everywhere[m] else torch.where(
                rows.view(-1, *([1] * (z.dim() - 1))), damaged, z)
            embeddings[name] = damaged[ours]
        return embeddings, present, masks

    def observe(self, model, embeddings, present, masks):
        """The controller's measurement on the first ``ig_samples`` samples of the micro-batch (all
        for 0; the batches are drawn in random order, so these are a random subset): its stacked
        pass has (number of target sets + 1) copies of them."""
        rows = slice(self.ig_samples or None)
        self.controller.observe(model, {k: z[rows] for k, z in embeddings.items()}, present[rows],
                                {k: m[rows] for k, m in (masks or {}).items()})

    def draw_targets(self, batch_size):
        """(B, M) strengths: one set of targets per sample (``per_sample``) or one for the batch."""
        if self.per_sample:
            return self.controller.choose_per_sample(batch_size)
        return self.controller.choose_per_sample(1).expand(batch_size, -1)

    # -- one step -----------------------------------------------------------------------------------------
    def training_step(self, model, batch, ctx):
        embeddings = model.encode(batch)
        present = model.all_present(batch)
        if ctx.step % self.ig_every == 0:
            self.observe(model, embeddings, present, batch.masks)
        strengths = self.draw_targets(ctx.batch_rows(len(batch))[0])
        perturbed, perturbed_present, perturbed_masks = self.intervene(embeddings, present, batch.masks, strengths,
                                                                       ctx)
        decode = bool(ctx.rec_weight) and getattr(model, "decodes", False)
        outputs = forward_pair(model, embeddings, perturbed, present, perturbed_present, batch.masks, decode=decode,
                               perturbed_masks=perturbed_masks)
        erank = normalised_effective_rank(ctx.gather_rows(outputs.joint_tilde), k=self.erank_k,
                                          generator=self.generator)
        terms = objective_terms(outputs, batch.labels, embeddings, batch.masks, erank=erank)
        destructive = terms.destructive(self.lambdas(), ctx.rec_weight)
        logs = self.mask_step(terms.task, destructive, ctx)
        if (self.hypergrad == "neumann" and ctx.step > 0 and ctx.step % self.hyper_every == 0
                and ctx.step != self.last_hyper_step):
            self.last_hyper_step = ctx.step
            self.hyper_step(model, batch, embeddings, perturbed, present, perturbed_present, perturbed_masks,
                            ctx.rec_weight)
        logs.update(loss=(terms.task + destructive).item(), **terms.log(), **self.controller.log(), **self.hyper_log)
        logs.update({f"target/{n}": s for n, s in zip(model.modalities, strengths.mean(0).tolist())})
        logs.update({f"lambda/{n}": v for n, v in zip(LAMBDA_NAMES, self.lambdas().tolist())})
        return logs

    def mask_step(self, clean, destructive, ctx):
        """g = g_c + M * g_d into ``p.grad`` (plain g_c + g_d for ``mask=off``); the mask's figures.
        g_c, g_d and the probe are the global batch's (``ctx.reduce_mean``), so every rank
        masks alike."""
        if self.mask == "off":
            grads = ctx.reduce_mean(ctx.grads(clean + destructive))
            ctx.accumulate(grads)
            return {}
        probe_due = self.masker.probe_due()
        g_c = torch.autograd.grad(clean, self.params, retain_graph=True, create_graph=probe_due, allow_unused=True)
        probe = None
        if probe_due:  # u * (H u) for the clean loss's Hessian (docs/method_training.md, "Masking")
            probe = self.masker.hutchinson([p * 0 if g is None else g for g, p in zip(g_c, self.params)])
        g_d = ctx.grads(destructive)
        g_c = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(g_c, self.params)]
        ctx.reduce_mean(g_c + g_d + (probe or []))
        stats = self.masker.apply(g_c, g_d, probe)
        ctx.accumulate(g_c)
        return {"mask/masked_fraction": float(stats.masked_fraction), "mask/destr_norm": float(stats.destr_norm),
                "mask/kept_norm": float(stats.kept_norm), "mask/tau": self.masker.tau}

    # -- the hypergradient --------------------------------------------------------------------------------
    def validation_batch(self):
        """The next validation batch (the split cycled, in a fresh order each pass) with random
        missing modalities, and its ``present`` mask."""
        index = self.dataset.indices("val")
        if self.val_cursor >= len(index):
            self.val_cursor, self.val_pass = 0, self.val_pass + 1
        order = torch.randperm(len(index), generator=torch.Generator().manual_seed(self.val_seed + self.val_pass))
        batch = self.dataset.batch(index[order[self.val_cursor:self.val_cursor + self.batch_size]]).to(self.device)
        self.val_cursor += self.batch_size
        present = random_present(len(batch), len(self.dataset.modalities), self.val_drop, self.generator,
                                 batch.labels.device)
        return batch, present

    def hyper_step(self, model, batch, embeddings, perturbed, present, perturbed_present, perturbed_masks, rec_weight):
        """One step of phi along the certified implicit hypergradient (encoders fixed: the embeddings
        of this step are constants, so only the fusion layers and head are differentiated). Under
        data parallelism every rank solves for the global micro-batch (its rows gathered), so the
        ranks' solves, certificates and steps of phi are the same."""
        gather = distributed.gather_rows
        fixed = {k: gather(v.detach()) for k, v in embeddings.items()}
        fixed_perturbed = {k: gather(v.detach()) for k, v in perturbed.items()}
        present, perturbed_present, labels = gather(present), gather(perturbed_present), gather(batch.labels)
        masks = {k: gather(v) for k, v in batch.masks.items()}
        perturbed_masks = {k: gather(v) for k, v in perturbed_masks.items()}
        decode = bool(rec_weight) and getattr(model, "decodes", False)
        val = [self.validation_batch() for _ in range(self.val_batches)]
        with torch.no_grad():
            val_embeddings = [{k: v.detach() for k, v in model.encode(b).items()} for b, _ in val]

        def inner_loss():
            out = forward_pair(model, fixed, fixed_perturbed, present, perturbed_present, masks,
                               decode=decode, perturbed_masks=perturbed_masks)
            erank = normalised_effective_rank(out.joint_tilde, k=self.erank_k, generator=self.generator)
            decoded = list(out.decoded.values()) if decode else []
            outputs = (out.logits, out.logits_tilde, out.joint, out.joint_tilde, erank, *decoded)

            def loss_of_outputs(o):  # convex in the outputs except erank, where it is linear: GGN stays PSD
                rebuilt = Outputs(o[2], o[0], o[3], o[1], dict(zip(out.decoded, o[5:])) if decode else None)
                terms = objective_terms(rebuilt, labels, fixed, masks, erank=o[4])
                return terms.task + terms.destructive(self.phi.exp(), rec_weight)
            return outputs, loss_of_outputs

        def outer_loss():
            return sum(task_loss(model.head(model.fuse(z, p, b.masks)), b.labels)
                       for (b, p), z in zip(val, val_embeddings)) / len(val)

        was_training = model.training
        model.eval()  # no dropout noise inside the solve
        try:
            (g,), cert = implicit_hypergradient(inner_loss, outer_loss, self.hyper_targets, [self.phi],
                                                curvature="ggn", damping=self.hyper_damping,
                                                relative_damping=self.hyper_rel_damping, tol=self.hyper_tol,
                                                max_iter=self.hyper_iters, power_iters=self.hyper_power_iters,
                                                power_init=self.power_init or None)
        finally:
            model.train(was_training)
        self.power_init = [t.detach().clone() for t in cert.eigvec] if cert.eigvec else []
        norm = float(g.norm())
        applied = cert.certified and math.isfinite(norm)
        if applied:  # an RMS-normalised step (each log-weight moves at most hyper_max_step)
            self.hyper_sq.mul_(HYPER_RMS_DECAY).add_((1 - HYPER_RMS_DECAY) * g.square())
            self.hyper_count += 1
            scale = (self.hyper_sq / (1 - HYPER_RMS_DECAY ** self.hyper_count)).sqrt().clamp_min(1e-12)
            with torch.no_grad():
                step = (self.hyper_lr * g / scale).clamp(-self.hyper_max_step, self.hyper_max_step)
                self.phi.sub_(step).clamp_(*LOG_LAMBDA_RANGE)
        log = self.hyper_log
        log.update({"hyper/applied": float(applied), "hyper/certified": float(cert.certified),
                    "hyper/iterations": float(cert.iterations), "hyper/residual_ratio": float(cert.residual_ratio),
                    "hyper/error_bound": float(min(cert.error_bound, 1e30)), "hyper/grad_norm": norm,
                    "hyper/damping": float(cert.damping),
                    "hyper/solves": log["hyper/solves"] + 1, "hyper/applied_total": log["hyper/applied_total"] + applied})
        return g, cert
