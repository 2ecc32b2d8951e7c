"""``method="modalimmune"``: the ModalImmune training step (docs/method_training.md, "Training step").

Each micro-batch: encode once; the controller measures the information gain of its target sets
from the cached embeddings (every ``ig_every`` steps) and draws targets and strengths (every
step); the intervention turns the clean :class:`Views` into the perturbed ones; the objective
gives the clean loss and the destructive part; :meth:`CurvatureMasker.step` combines their
gradients g_c and g_d into ``p.grad`` (Hutchinson probe of the clean loss every ``probe_every``
steps). Every ``hyper_every`` optimizer steps the :class:`LambdaTuner` moves
phi = (log l_imm, log l_con, log l_rank, log l_single) along the certified implicit hypergradient of a validation
loss with random missing modalities; an uncertified hypergradient is logged and not applied.

Ablations (options of the method spec, e.g. ``modalimmune[mask=off]``):
``controller=ig|shapley|uniform``, ``collapse=spectral|zero|fixed_rank``,
``mask=hard|soft|off``, ``hypergrad=neumann|off``, ``joint_targets=false`` (targets drawn per modality).
"""

import torch

from ...models.base import eval_mode
from ..base import Method, register_method
from .controller import InfoGainController
from .interventions import Views, draw_swaps, intervene
from .learnability import head_parameters
from .masker import CurvatureMasker
from .objective import SingleViews, forward_pair, normalised_effective_rank, objective_terms, single_view_patterns
from .options import Options
from .tuner import LambdaTuner, fusion_head_parameters


@register_method("modalimmune")
class ModalImmune(Method):
    """Self-destructive training (docs/method.md). Every field of :class:`Options` is a
    method-spec option.

    Data-parallel: the statistics over a batch's samples (the collapse's SVD, the effective
    rank, the noise power, the per-sample draws) are taken over the global micro-batch, and
    g_c, g_d and the probe are reduced before the mask (docs/distributed.md, "Methods")."""

    Options = Options
    reduces_gradients = True

    def __init__(self, **options):
        self.declared = self.options = Options(**options)  # options: the declared ones resolved for the model

    def check(self, modalities, task="classification"):
        self._controller(modalities, 0, task)

    def _controller(self, modalities, seed, task):
        try:
            return InfoGainController(modalities, seed=seed, regression=task == "regression",
                                      **self.options.controller_options())
        except ValueError as error:
            raise ValueError(f"method modalimmune: {error}") from None

    def setup(self, model, env):
        super().setup(model, env)
        self.options = self.declared.for_model(model)
        options, seed = self.options, env.seed
        self.controller = self._controller(model.modalities, seed + 104729, env.task)
        self.params = list(env.params)
        self.validation_batch = env.validation_batch
        if options.controller == "learnability" and env.validation_batch is None:
            raise ValueError("method modalimmune: controller 'learnability' needs validation batches "
                             "(MethodEnv.validation_batch; the Trainer gives them)")
        self.learn_params = None  # the parameters the learnability differentiates, found at its first measurement
        self.masker = (None if options.mask == "off" else
                       CurvatureMasker(self.params, seed=seed + 15485863, **options.masker_options()))
        self.tuner = LambdaTuner(model, self.params, options, env.validation_batch, self.generator, env.device)
        self.last_hyper_step = -1

    def state_dict(self):
        return {**super().state_dict(), "controller": self.controller.state_dict(),
                "masker": self.masker.state_dict() if self.masker else {}, "tuner": self.tuner.state_dict(),
                "last_hyper_step": self.last_hyper_step}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.controller.load_state_dict(state["controller"])
        if self.masker:
            self.masker.load_state_dict(state["masker"])
        self.tuner.load_state_dict(state["tuner"])
        self.last_hyper_step = int(state["last_hyper_step"])

    def finish_step(self, applied):
        for part in (self.controller, self.masker, self.tuner):
            if part is not None:
                part.settle(applied)

    def observe(self, model, views, labels, natural=False):
        """The controller's measurement, on the first ``ig_samples`` samples of the micro-batch (all
        for 0; the batches are drawn in random order, so these are a random subset). Learnability:
        and on as many of one validation batch (encoded here, without gradients); its stacked fusion
        pass has (number of target sets) copies of each. Information gain: its stacked pass has
        (number of target sets + 1) copies of them.
        ``natural``: the data lacks modalities in some samples (the gains are then averaged over the
        samples that have them)."""
        rows = slice(self.options.ig_samples or None)
        first = views.apply(lambda t: t[rows])
        if self.options.controller == "learnability":
            val = self.validation_batch().select(rows)  # a random subset of the validation split
            # the learnability's measurement is in eval mode: no dropout in its embeddings either
            with eval_mode(model), torch.no_grad():
                val_views = Views(model.encode(val), model.all_present(val), val.masks)
            through_fusion = self.options.learn_on == "fusion_head"
            if self.learn_params is None:
                self.learn_params = (fusion_head_parameters(model, self.params) if through_fusion
                                    else head_parameters(model, self.params, val_views))
            self.controller.observe_learnability(model, self.learn_params, (first, labels[rows]),
                                                 (val_views, val.labels), natural, through_fusion)
            return
        self.controller.observe(model, first.embeddings, first.present, first.masks, natural)

    def draw_targets(self, batch_size):
        """(B, M) strengths on the host: one set of targets per sample (``per_sample``) or one for the batch."""
        if self.options.per_sample:
            return self.controller.choose_per_sample(batch_size)
        return self.controller.choose_per_sample(1).expand(batch_size, -1)

    def intervene(self, views, strengths, ctx=None):
        """The perturbed views of this step (:func:`interventions.intervene` with the method's options)."""
        swaps = draw_swaps(strengths, self.options.swap_share, self.controller.generator)
        return intervene(views, strengths, self.controller.modalities, kind=self.options.intervention,
                         collapse_mode=self.options.collapse, generator=self.generator, ctx=ctx,
                         blank_share=self.options.blank_share, swaps=swaps)

    def training_step(self, model, batch, ctx):
        options = self.options
        clean = Views(model.encode(batch), model.all_present(batch), batch.masks)
        if ctx.step % options.ig_every == 0:
            self.observe(model, clean, batch.labels, natural=batch.present is not None)
        strengths = self.draw_targets(ctx.batch_rows(len(batch))[0])
        perturbed = self.intervene(clean, strengths, ctx)
        decode = bool(ctx.rec_weight) and getattr(model, "decodes", False)
        # "rest" with two modalities: every draw already leaves one view alone (q = 1), nothing is left to add
        singles = options.lambda_single > 0 and (len(model.modalities) > 2 or options.single_share == "full")
        patterns, weights = self.single_view_rows(clean.present, ctx) if singles else (None, None)
        outputs = forward_pair(model, clean, perturbed, decode=decode, patterns=patterns)
        # a guard that is off stays 0 (the hypergradient too): its SVD would only be multiplied by 0
        erank = (normalised_effective_rank(ctx.gather_rows(outputs.joint_tilde), k=options.erank_k,
                                           generator=self.generator)
                 if options.lambda_rank > 0 else outputs.logits.new_zeros(()))
        terms = objective_terms(outputs, batch.labels, clean.embeddings, clean.masks, erank=erank,
                                consistency=options.consistency)
        single, single_share = None, 0.0
        if singles:
            single = SingleViews.of(outputs.pattern_logits, batch.labels, weights).loss()
            single_share = self.single_view_share(strengths) if options.single_share == "rest" else 1.0
        destructive = terms.destructive(self.tuner.lambdas(), ctx.rec_weight, single, single_share)
        logs = self.masked_gradient(terms.task, destructive, ctx)
        if (options.hypergrad == "neumann" and ctx.step > 0 and ctx.step % options.hyper_every == 0
                and ctx.step != self.last_hyper_step):
            self.last_hyper_step = ctx.step
            self.tuner.step(model, clean.gathered(), perturbed.gathered(), ctx.gather_rows(batch.labels),
                            ctx.rec_weight, single_share)
        logs.update(loss=(terms.task + destructive).detach(), **terms.log(), **self.controller.log(), **self.tuner.log)
        logs["term/single"] = terms.task.new_zeros(()) if single is None else single.detach()
        logs.update({f"target/{n}": s for n, s in zip(model.modalities, strengths.mean(0).unbind())})
        logs.update(self.tuner.lambda_log())
        return logs

    def single_view_rows(self, present, ctx):
        """The single-view term's patterns and weights for this rank's rows (:func:`single_view_patterns`):
        drawn over the global micro-batch (``ctx.gather_rows``: the same draw and the same n_m on every rank,
        as in one process), this rank's rows kept, their weights over its share (``ctx.rank_weight``), so
        that the ranks' gradients, combined by that share, are the one process's."""
        patterns, weights = single_view_patterns(ctx.gather_rows(present), each=self.options.single_views,
                                                 generator=self.generator)
        ours = ctx.batch_rows(present.shape[0])[1]
        return patterns[:, ours], weights[:, ours] / ctx.rank_weight

    def single_view_share(self, strengths):
        """1 - q, q the share of this step's draws that already leave one modality alone (``strengths``: the
        (B, M) host draw): the single-view term weighs l_single (1 - q), so that the single views get
        l_single in all, the draws' part and the term's (docs/method.md, "Single views"). A host 0-dim
        tensor: no read of a value."""
        removed = (strengths >= 1).sum(1)
        return (1 - (removed == strengths.shape[1] - 1).double().mean()).float()

    def masked_gradient(self, clean, destructive, ctx):
        """g = g_c + M * g_d into ``p.grad`` through :meth:`CurvatureMasker.step` (plain g_c + g_d for
        ``mask=off``), on the global batch's gradients (``ctx.reduce_mean``); the mask's figures."""
        if self.masker is None:
            ctx.accumulate(ctx.reduce_mean(ctx.grads(clean + destructive)))
            return {}
        stats = self.masker.step(clean, destructive, ctx.reduce_mean, grad_scale=ctx.loss_scale)
        return {"mask/masked_fraction": stats.masked_fraction, "mask/destr_norm": stats.destr_norm,
                "mask/kept_norm": stats.kept_norm, "mask/tau": self.masker.tau}
