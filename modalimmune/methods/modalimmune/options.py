"""The options of ``method="modalimmune[...]"``, validated once (docs/method_training.md, "Options")."""

import math
from dataclasses import dataclass, replace

from ... import checks
from ..base import option_label
from .controller import ESTIMATORS, SCALES
from .interventions import COLLAPSES, INTERVENTIONS
from .objective import CONSISTENCIES, SINGLE_VIEWS

MASKS = ("hard", "soft", "off")
HYPERGRADS = ("neumann", "off")
HYPER_PARAMS = ("fusion_head", "all")
SINGLE_SHARES = ("rest", "full")
LAMBDA_NAMES = ("imm", "con", "rank", "single")
LOG_LAMBDA_RANGE = (math.log(1e-3), math.log(10.0))  # phi is kept inside these bounds


@dataclass(frozen=True)
class Options:
    """Every option of the method; the docs' options table says what each does."""

    # ablation switches and the kind of intervention (docs/method.md, "Defaults and the evidence")
    controller: str = "uniform"
    collapse: str = "spectral"
    mask: str = "off"
    hypergrad: str = "off"
    intervention: str = "collapse"
    consistency: str = "kl"
    # initial weights of the destructive terms (phi = their logs)
    lambda_imm: float = 3.0
    lambda_con: float = 0.0  # 0: off (docs/method.md, "Defaults and the evidence"); 0.1 when on
    lambda_rank: float = 0.0  # 0: off (docs/method.md, "Defaults and the evidence"); 0.01 when on
    lambda_single: float = 1.0  # the single-view term (docs/method.md, "Single views")
    single_views: str = "auto"  # all: every view alone (M copies); one: one view alone per sample; auto: for_model
    single_share: str = "rest"  # rest: l_single (1 - q), what the draws leave; full: l_single every step, any M
    blank_share: float = 0.0  # of the removed targets: kept present, their embedding the batch's mean (no sample in it)
    swap_share: float = 0.0  # of the removed targets with two views left: kept present, another sample's embedding
    # controller
    temperature: float = 0.5  # learnability: a share of the largest score; ig: in nats (0.05 was its default)
    epsilon: float = 0.2
    s_min: float = 1.0
    s_max: float = 1.0
    momentum: float = 0.9
    max_targets: int = 5
    budget: float = 0.0  # 0: no cap
    joint_targets: bool = True
    per_sample: bool = True
    learn_scale: str = "max"
    learn_on: str = "head"
    learn_shrink: bool = False
    ig_every: int = 8
    ig_samples: int = 16  # 0: the whole micro-batch
    erank_k: int = 16
    # masker
    quantile: float = 0.9
    beta: float = 0.99
    probe_every: int = 10
    # hypergradient
    hyper_every: int = 25
    hyper_lr: float = 0.1
    hyper_max_step: float = 0.5
    hyper_damping: float = 1.0
    hyper_rel_damping: float = 0.25
    hyper_tol: float = 0.05
    hyper_iters: int = 50
    hyper_power_iters: int = 5
    hyper_params: str = "fusion_head"
    val_drop: float = 0.5
    val_batches: int = 1

    def __post_init__(self):
        label = lambda name: option_label("modalimmune", name)  # noqa: E731
        for name, options in (("controller", ESTIMATORS), ("collapse", COLLAPSES), ("mask", MASKS),
                              ("hypergrad", HYPERGRADS), ("intervention", INTERVENTIONS),
                              ("consistency", CONSISTENCIES), ("learn_scale", SCALES),
                              ("single_views", ("auto", *SINGLE_VIEWS)), ("single_share", SINGLE_SHARES),
                              ("learn_on", ("head", "fusion_head")),
                              ("hyper_params", HYPER_PARAMS)):
            checks.choice(label(name), getattr(self, name), options)
        for name in ("lambda_imm", "lambda_con", "lambda_rank", "lambda_single", "hyper_lr", "hyper_max_step",
                     "hyper_damping", "hyper_rel_damping", "hyper_tol", "budget", "temperature"):
            checks.number(label(name), getattr(self, name), 0.0, low_open=name == "temperature")
        for name in ("epsilon", "s_min", "s_max", "quantile"):
            checks.number(label(name), getattr(self, name), 0.0, 1.0)
        checks.number(label("s_max"), self.s_max, self.s_min, 1.0)
        for name in ("momentum", "beta", "val_drop", "blank_share", "swap_share"):
            checks.number(label(name), getattr(self, name), 0.0, 1.0, high_open=True)
        for name in ("max_targets", "ig_every", "erank_k", "hyper_every", "hyper_iters", "hyper_power_iters",
                     "val_batches"):
            checks.integer(label(name), getattr(self, name), 1)
        for name in ("ig_samples", "probe_every"):
            checks.integer(label(name), getattr(self, name), 0)
        for name in ("joint_targets", "per_sample", "learn_shrink"):
            checks.flag(label(name), getattr(self, name))

    def for_model(self, model):
        """These options for ``model``: ``single_views="auto"`` is ``all`` where the model's patterns are
        cheap (its ``cheap_patterns``: the M stacked single views cost little beyond their head rows) and
        ``one`` elsewhere, where each pattern costs about a fusion pass (docs/method.md, "Single views")."""
        if self.single_views != "auto":
            return self
        return replace(self, single_views="all" if getattr(model, "cheap_patterns", False) else "one")

    def initial_phi(self):
        """phi = (log l_imm, log l_con, log l_rank, log l_single), each inside ``LOG_LAMBDA_RANGE`` (a weight
        of 0, a term that is off, starts at the range's low end and stays off: ``LambdaTuner.weights``)."""
        low, high = LOG_LAMBDA_RANGE
        return [min(max(math.log(max(getattr(self, f"lambda_{n}"), 1e-30)), low), high) for n in LAMBDA_NAMES]

    def controller_options(self):
        """The keyword arguments of :class:`InfoGainController`."""
        return dict(estimator=self.controller, temperature=self.temperature, epsilon=self.epsilon,
                    s_min=self.s_min, s_max=self.s_max, momentum=self.momentum, max_targets=self.max_targets,
                    budget=self.budget or None, joint=self.joint_targets,
                    scale=self.learn_scale, shrink=self.learn_shrink)

    def masker_options(self):
        """The keyword arguments of :class:`CurvatureMasker`."""
        return dict(quantile=self.quantile, beta=self.beta, probe_every=self.probe_every, mode=self.mask)

