"""InfoGainController: which modalities to remove or collapse, and how hard
(docs/method_training.md, "Controller").

The default estimator, ``"learnability"``, scores each target set S by how much training
with S removed still lowers the held-out loss, ``a_S = grad L_S(train) . grad L_S(val)``
(:mod:`.learnability`), and draws from ``pi_S = (1 - eps) softmax(a_S / (T a_max) + log u_S) + eps u_S``
(a_max: the largest |a_S| seen, or now with ``scale="current"``; u: the uniform controller's draw):
a pattern at its own ceiling (a_S near 0) stops attracting draws, and the uniform share keeps
every pattern trained. The information gain below then only sets the strengths (when
``s_min < s_max``). The estimators ``"ig"`` and ``"shapley"`` draw by the information gain
itself (the first design, kept as ablations: it measures reliance, and starves a pattern that
is still learnable in favour of one at its ceiling).

The information a modality carries for the current model is the expected KL
divergence between the predictions with all modalities and with that modality
knocked out (collapsed at strength 1, which the method realises as removal:
``present = False``, the model's own missing handling),

    IG_m = E_x KL(p(y|x) || p(y|x with m knocked out)),

measured from cached embeddings (the M copies with one modality removed go
through fusion and head in one stacked pass, in eval mode; no encoder re-run) and tracked as an
EMA with a count. With ``estimator="shapley"``
(M <= 5) the estimate is instead the exact Shapley value of
``v(S) = -E KL(p(y|x) || p(y|x_S))`` from the 2^M coalitions. The target is drawn from

    pi_m = (1 - eps) softmax(IG / T)_m + eps / M

and collapsed at ``s_m = s_min + (s_max - s_min) IG_m / max_j IG_j``;
``estimator="uniform"`` (the ablation) draws uniformly at the mid strength.

With ``joint=True`` and several targets a step (``max_targets`` > 1) the IG
estimator measures every set S of up to ``max_targets`` modalities removed
together, ``IG_S = E_x KL(p(y|x) || p(y|x without S))``, and draws the set
itself from ``pi_S = (1 - eps) softmax(IG / T + log u)_S + eps u_S`` (``u``: the
uniform controller's draw), so the missing patterns the model handles worst
are trained most (docs/method_training.md, "Joint targets").
"""

import itertools
import math

import torch

from ... import checks, distributed
from ...models.base import eval_mode
from .learnability import learnability, pattern_representations

ESTIMATORS = ("learnability", "ig", "shapley", "uniform")
SET_ESTIMATORS = ("learnability", "ig")  # those that can score every target set (joint)
SCALES = ("current", "max")  # learnability: the scores over the largest |a_S| now, or the largest ever
MAX_SHAPLEY_MODALITIES = 5
MAX_JOINT_SETS = 256  # the joint estimator's measurement is one pass over this many copies of the batch


def _kl(log_p, log_q, weights=None, regression=False):
    """Mean over the batch (dimension -2) of KL(p || q) from log-probabilities; ``log_q`` may hold
    several variants stacked in front. ``weights`` (variants, batch) bool: the mean over the samples
    each variant counts (empty: 0). ``regression``: p and q are the predicted means of Gaussians of a
    fixed unit variance, whose KL is half the squared change of the prediction."""
    if regression:
        kl = 0.5 * (log_p - log_q).square().sum(-1)
    else:
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if weights is None:
        return kl.mean(-1)
    return (kl * weights).sum(-1) / weights.sum(-1).clamp_min(1)


@torch.no_grad()
def _variant_predictions(model, embeddings, present, masks, variants, regression=False):
    """Log-probabilities (``regression``: the predicted values) of the intact batch and of each variant
    (a set of modality indices kept,
    the others knocked out: removed, ``present = False``, the model's own missing handling, as
    the collapse at strength 1 and the evaluation do): one fusion-and-head pass over the variants
    stacked along the batch, in eval mode (no dropout noise in the comparison).
    Returns (intact (B, C), variants (V, B, C))."""
    M = len(model.modalities)
    variants = [set(range(M))] + [set(v) for v in variants]
    kept = torch.tensor([[i in v for i in range(M)] for v in variants], device=present.device)
    with eval_mode(model):
        joint = pattern_representations(model, embeddings, present, masks or {}, kept)
        logits = model.head(joint.flatten(0, 1)).float().unflatten(0, joint.shape[:2])
    log_p = logits if regression else logits.log_softmax(-1)
    return log_p[0], log_p[1:]


def information_gain(model, embeddings, present, masks=None, target_sets=None, natural=False, regression=False):
    """``IG_S`` on one batch for every set S of modality indices in ``target_sets`` (default: each
    modality alone, ``IG_m``), the modalities of S removed together: a float64 tensor. With
    ``natural`` (``present`` comes from the data, some samples lack modalities) each ``IG_S`` is the
    mean over the samples that have a modality of S: removing what a sample lacks measures nothing.
    ``regression``: the divergence of Gaussian predictions with a fixed unit variance (see :func:`_kl`)."""
    M = len(model.modalities)
    target_sets = [{m} for m in range(M)] if target_sets is None else target_sets
    full, knocked = _variant_predictions(model, embeddings, present, masks,
                                         [set(range(M)) - set(s) for s in target_sets], regression)
    weights = None
    if natural:
        members = torch.tensor([[m in s for m in range(M)] for s in target_sets], device=present.device)
        weights = (members[:, None, :] & present[None]).any(-1)
    return _kl(full, knocked, weights, regression).double().cpu()


def coalition_values(model, embeddings, present, masks=None, regression=False):
    """``v(S) = -E KL(p(y|x) || p(y|x_S))`` for every coalition S (a frozenset of
    modality indices); the modalities outside S are knocked out. 2^M variants, one pass."""
    M = len(model.modalities)
    coalitions = [frozenset(c) for size in range(M + 1) for c in itertools.combinations(range(M), size)]
    full, predictions = _variant_predictions(model, embeddings, present, masks, coalitions, regression)
    values = _kl(full, predictions, regression=regression).double().neg().tolist()
    return dict(zip(coalitions, values))


def shapley_from_values(values, num_players):
    """Exact Shapley values phi_m = sum_{S not containing m} |S|!(M-|S|-1)!/M! (v(S+m) - v(S))."""
    phi = torch.zeros(num_players, dtype=torch.float64)
    for coalition, value in values.items():
        size = len(coalition)
        for m in range(num_players):
            if m not in coalition:
                weight = math.factorial(size) * math.factorial(num_players - size - 1) / math.factorial(num_players)
                phi[m] += weight * (values[coalition | {m}] - value)
    return phi


def shapley_values(model, embeddings, present, masks=None, regression=False):
    """Exact Shapley values of :func:`coalition_values` (M <= 5); they sum to v(all) - v(empty)."""
    if len(model.modalities) > MAX_SHAPLEY_MODALITIES:
        raise ValueError(f"estimator: 'shapley' needs M <= {MAX_SHAPLEY_MODALITIES} modalities, "
                         f"got {len(model.modalities)}")
    return shapley_from_values(coalition_values(model, embeddings, present, masks, regression),
                               len(model.modalities))


class InfoGainController:
    """Per-modality information-gain estimates and the choice of target and strength.

    Args:
        modalities: the modality names, in the model's order.
        estimator: ``"learnability"`` (held-out loss drop per pattern, :meth:`observe_learnability`),
            ``"ig"`` (KL information gain), ``"shapley"`` (exact Shapley value, M <= 5) or
            ``"uniform"`` (no estimate: uniform target, mid strength).
        temperature, epsilon: of the target distribution pi.
        s_min, s_max: the strength range.
        momentum: EMA factor of the estimates (the first observation sets them).
        max_targets: how many modalities one step may collapse together (at most M - 1); each
            step draws its count uniformly from 1..max_targets.
        budget: cap on the summed strength of the targets of one step (None: none);
            the first target is always taken.
        joint: with the ``"ig"`` estimator and ``max_targets`` > 1, estimate and draw the sets of
            targets themselves (every set of up to ``max_targets`` modalities, singles first)
            instead of drawing the modalities of a set from the per-modality pi.
        regression: the model predicts a value, not class logits: the gains are the divergences of
            Gaussian predictions of a fixed unit variance (half the squared change of the prediction).
        seed: of the controller's own generator (its state is in the checkpoint).
        scale: learnability: the scores as shares of the largest |a_S| the EMAs have had (``"max"``) or
            of the largest now (``"current"``).
        shrink: learnability: shrink each EMA by its own noise before the draw (:meth:`resolved`).
    """

    def __init__(self, modalities, *, estimator="ig", temperature=1.0, epsilon=0.1, s_min=0.2, s_max=0.9,
                 momentum=0.9, max_targets=1, budget=None, joint=False, regression=False, seed=0, scale="max",
                 shrink=False):
        self.scale_mode = checks.choice("scale", scale, SCALES)
        self.shrink = checks.flag("shrink", shrink)
        self.modalities = tuple(modalities)
        self.regression = checks.flag("regression", regression)
        if not self.modalities:
            raise ValueError("modalities: expected at least one modality")
        self.estimator = checks.choice("estimator", estimator, ESTIMATORS)
        if estimator == "shapley" and len(self.modalities) > MAX_SHAPLEY_MODALITIES:
            raise ValueError(f"estimator: 'shapley' needs M <= {MAX_SHAPLEY_MODALITIES} modalities, "
                             f"got {len(self.modalities)}")
        self.temperature = checks.number("temperature", temperature, 0.0)
        if self.temperature == 0:
            raise ValueError("temperature: expected a value > 0, got 0.0")
        self.epsilon = checks.number("epsilon", epsilon, 0.0, 1.0)
        self.s_min = checks.number("s_min", s_min, 0.0, 1.0)
        self.s_max = checks.number("s_max", s_max, self.s_min, 1.0)
        self.momentum = checks.number("momentum", momentum, 0.0, 1.0, high_open=True)
        if isinstance(max_targets, bool) or not isinstance(max_targets, int) or max_targets < 1:
            raise ValueError(f"max_targets: expected an int >= 1, got {max_targets!r}")
        self.max_targets = min(max_targets, max(1, len(self.modalities) - 1))
        self.budget = None if budget is None else checks.number("budget", budget, 0.0)
        if not isinstance(joint, bool):
            raise ValueError(f"joint: expected true or false, got {joint!r}")
        self.joint = joint and self.estimator in SET_ESTIMATORS and self.max_targets > 1
        M = len(self.modalities)
        # the sets the estimates are kept for: the single modalities, then (joint) the larger sets
        self.target_sets = [frozenset(c) for size in range(1, (self.max_targets if self.joint else 1) + 1)
                            for c in itertools.combinations(range(M), size)]
        if self.joint and len(self.target_sets) > MAX_JOINT_SETS:
            raise ValueError(f"joint: {len(self.target_sets)} sets of up to {self.max_targets} of {M} modalities, "
                             f"at most {MAX_JOINT_SETS} can be measured; lower max_targets")
        self.membership = torch.tensor([[m in s for m in range(M)] for s in self.target_sets])
        # the uniform controller's probability of each set: a size uniform in 1..max_targets, then a set of that size
        self.uniform_draw = torch.tensor([1 / (self.max_targets * math.comb(M, len(s))) for s in self.target_sets],
                                         dtype=torch.float64)
        self.estimates = torch.zeros(len(self.target_sets), dtype=torch.float64)
        self.squares = torch.zeros(len(self.target_sets), dtype=torch.float64)  # EMA of the squared values
        self.counts = torch.zeros(len(self.target_sets), dtype=torch.int64)
        self.gains = torch.zeros(M, dtype=torch.float64)  # learnability: the IG_m that set the strengths
        self.scale = torch.zeros((), dtype=torch.float64)  # learnability: the largest |a_S| its EMAs have had
        self.generator = torch.Generator().manual_seed(seed)
        self._before_step = None  # (estimates, counts) before the current optimizer step

    # -- estimates ------------------------------------------------------------------------------
    def measure(self, model, embeddings, present, masks=None, natural=False):
        """This batch's estimate per target set (float64, one per ``target_sets``: per modality
        unless ``joint``); under data parallelism the whole batch's (the ranks' batch means
        weighted by their sample counts). ``natural``: ``present`` is the data's (see
        :func:`information_gain`)."""
        if self.estimator == "shapley":
            values = shapley_values(model, embeddings, present, masks, self.regression)
        else:
            values = information_gain(model, embeddings, present, masks, self.target_sets, natural, self.regression)
        return distributed.batch_mean(values, present.shape[0], present.device)

    def update(self, values, which=None):
        """Folds ``values`` (one per target set) into the EMAs of the sets in ``which`` (default: all)."""
        values = torch.as_tensor(values, dtype=torch.float64)
        if values.shape != self.estimates.shape or not torch.isfinite(values).all():
            raise ValueError(f"values: expected {len(self.target_sets)} finite estimates, got {values.tolist()}")
        chosen = torch.zeros(len(self.target_sets), dtype=torch.bool)
        chosen[list(range(len(self.target_sets))) if which is None else list(which)] = True
        self._fold(values, chosen)

    def _fold(self, values, chosen):
        self._journal()
        first = chosen & (self.counts == 0)
        blended = self.momentum * self.estimates + (1 - self.momentum) * values
        self.estimates = torch.where(first, values, torch.where(chosen, blended, self.estimates))
        squares = self.momentum * self.squares + (1 - self.momentum) * values.square()
        self.squares = torch.where(first, values.square(), torch.where(chosen, squares, self.squares))
        self.counts += chosen.long()
        self.scale = torch.maximum(self.scale, self.estimates.abs().max())

    def observe(self, model, embeddings, present, masks=None, natural=False):
        """Measures this batch (no gradients) and updates the EMAs of the sets whose measurement
        is finite (a non-finite batch changes nothing); returns the batch's values. The
        ``"learnability"`` estimator measures with :meth:`observe_learnability` instead."""
        if self.estimator == "uniform":
            return None
        if self.estimator == "learnability":
            raise ValueError("estimator: 'learnability' needs labels and validation data; "
                             "call observe_learnability")
        values = self.measure(model, embeddings, present, masks, natural)
        self._fold(values, torch.isfinite(values))
        return values

    def observe_learnability(self, model, params, train, validation, natural=False, through_fusion=False):
        """The ``"learnability"`` estimator's measurement: a_S of every target set from ``train`` and
        ``validation``, ``(Views, labels)`` pairs, the gradients on ``params`` (the head's),
        folded into the EMAs where finite; with ``s_min < s_max`` also the information gain of each
        modality on ``train`` (for the strengths). Returns the batch's a_S."""
        views, labels = train
        kept = ~self.membership.to(views.present.device)
        values = distributed.batch_mean(learnability(model, params, train, validation, kept, through_fusion),
                                        views.present.shape[0], views.present.device)
        self._fold(values, torch.isfinite(values))
        if self.s_min < self.s_max:
            gains = distributed.batch_mean(information_gain(model, views.embeddings, views.present, views.masks,
                                                            natural=natural, regression=self.regression),
                                           views.present.shape[0], views.present.device)
            first = self.gains.abs().sum() == 0
            blended = self.momentum * self.gains + (1 - self.momentum) * gains
            self.gains = torch.where(torch.isfinite(gains), gains if first else blended, self.gains)
        return values

    def _journal(self):
        """Remembers the estimates as they were before this optimizer step's first update."""
        if self._before_step is None:
            self._before_step = (self.estimates, self.squares, self.counts.clone(), self.gains, self.scale)

    def settle(self, applied):
        """End of an optimizer step: keeps its updates (``applied``) or undoes them (a skipped step)."""
        if not applied and self._before_step is not None:
            self.estimates, self.squares, self.counts, self.gains, self.scale = self._before_step
        self._before_step = None

    def modality_estimates(self):
        """The per-modality estimate (float64, (M,)): IG_m, the Shapley value, or a_{m} (learnability)."""
        return self.estimates[:len(self.modalities)]

    def scores(self):
        """The logits of pi before the uniform share: IG_S / T, or for learnability a_S / (T a_max), a_max
        the largest |a_S| the EMAs have had so far: scale-free (T is a share of that largest score), and
        self-limiting: as every pattern nears its floor the scores fall to 0 and the draw to the uniform
        one, instead of a ratio of vanishing numbers deciding it (all 0 before any measurement).
        ``scale="current"``: a_max the largest now (scale-free at every measurement, not self-limiting)."""
        if self.estimator != "learnability":
            return self.estimates / self.temperature
        scale = self.scale if self.scale_mode == "max" else self.estimates.abs().max()
        return torch.where(scale > 0, self.resolved() / (scale.clamp_min(1e-300) * self.temperature), 0.0)

    def resolved(self):
        """The learnability EMAs shrunk by their own noise: a_S max(0, 1 - se_S^2 / a_S^2) (the positive-part
        James-Stein factor), se_S^2 = (E[a^2] - E[a]^2) (1 - m) / (1 + m), the variance of an EMA of momentum m
        of independent measurements. A score within its noise of 0 tilts nothing; with ``shrink`` off, the
        EMAs themselves (docs/method.md, "Learnability")."""
        if not self.shrink:
            return self.estimates
        noise = (self.squares - self.estimates.square()).clamp_min(0) * (1 - self.momentum) / (1 + self.momentum)
        factor = (1 - noise / self.estimates.square().clamp_min(1e-300)).clamp_min(0)
        return self.estimates * factor

    # -- choices --------------------------------------------------------------------------------
    def probabilities(self):
        """pi (float64, (M,)): (1 - eps) softmax(IG / T) + eps / M; uniform for the ablation.
        For ``joint``, the probability that each modality is among the drawn targets."""
        M = len(self.modalities)
        if self.joint:
            return self.set_probabilities() @ self.membership.double()
        if self.estimator == "uniform":
            return torch.full((M,), 1.0 / M, dtype=torch.float64)
        return (1 - self.epsilon) * torch.softmax(self.scores(), 0) + self.epsilon / M

    def set_probabilities(self):
        """pi over ``target_sets`` (``joint``): (1 - eps) softmax(IG_S / T + log u_S) + eps u_S, where u_S
        is the uniform controller's probability of S (a size uniform in 1..max_targets, then a set of
        that size; equal scores draw u itself), both restricted to the sets within ``budget`` (the single
        modalities always)."""
        single = self.membership.sum(1) == 1
        allowed = (single | (self.membership.double() @ self.strengths() <= self.budget)
                   if self.budget is not None else torch.ones_like(single))
        uniform = torch.where(allowed, self.uniform_draw, 0.0)
        gains = torch.where(allowed, self.scores() + uniform.log(), -math.inf)
        return (1 - self.epsilon) * torch.softmax(gains, 0) + self.epsilon * uniform / uniform.sum()

    def strengths(self):
        """s_m = s_min + (s_max - s_min) IG_m / max_j IG_j (negative estimates count as 0);
        the mid strength everywhere for the ablation or before any positive estimate."""
        gains = (self.gains if self.estimator == "learnability" else self.modality_estimates()).clamp_min(0)
        mid = torch.full_like(gains, (self.s_min + self.s_max) / 2)
        if self.estimator == "uniform":
            return mid
        top = gains.max()  # a host tensor: no float() read, so the step stays free of host syncs
        return torch.where(top > 0, self.s_min + (self.s_max - self.s_min) * gains / top, mid)

    def _draw(self, n):
        """n independent draws: ``(order, strengths, taken)``, each (n, M) in draw order: the
        modalities drawn from pi without replacement, their strengths, and which are targets (the
        first always; then up to a count uniform in 1..``max_targets`` while the summed strength
        stays within ``budget``). For ``joint`` one set per draw from the sets' pi, in index order."""
        M = len(self.modalities)
        if self.joint:
            chosen = torch.multinomial(self.set_probabilities(), n, replacement=True, generator=self.generator)
            return torch.arange(M).expand(n, M), self.strengths().expand(n, M), self.membership[chosen]
        order = torch.multinomial(self.probabilities().expand(n, M), M, replacement=False, generator=self.generator)
        counts = (1 + torch.randint(self.max_targets, (n,), generator=self.generator) if self.max_targets > 1
                  else torch.ones(n, dtype=torch.int64))
        strengths = self.strengths()[order]
        rank = torch.arange(M)
        taken = rank < counts[:, None]
        if self.budget is not None:  # strengths are >= 0: the cumulative sum is monotone, so this is a prefix
            taken &= (strengths.cumsum(1) <= self.budget) | (rank == 0)
        return order, strengths, taken

    def choose(self):
        """One set of targets: ``[(modality index, strength), ...]`` in draw order."""
        order, strengths, taken = self._draw(1)
        return [(int(m), float(s)) for m, s in zip(order[0][taken[0]], strengths[0][taken[0]])]

    def choose_per_sample(self, n):
        """A set of targets for each of ``n`` samples, drawn independently: a float64 (n, M)
        matrix of strengths, 0 where a modality is not a target of that sample."""
        order, strengths, taken = self._draw(n)
        return torch.zeros(n, len(self.modalities), dtype=torch.float64).scatter_(
            1, order, torch.where(taken, strengths, 0.0))

    def log(self):
        """Per-modality estimate, strength and probability, for the metrics log (0-dim tensors)."""
        record = {}
        estimate = "learnability" if self.estimator == "learnability" else "ig"
        for name, ig, s, p in zip(self.modalities, self.modality_estimates().unbind(), self.strengths().unbind(),
                                  self.probabilities().unbind()):
            record.update({f"{estimate}/{name}": ig, f"strength/{name}": s, f"pi/{name}": p})
        return record

    # -- checkpoint -----------------------------------------------------------------------------
    def state_dict(self):
        return {"estimates": self.estimates.clone(), "squares": self.squares.clone(), "counts": self.counts.clone(),
                "gains": self.gains.clone(), "scale": self.scale.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        for key, like in (("estimates", self.estimates), ("squares", self.estimates), ("counts", self.estimates),
                          ("gains", self.gains)):
            if tuple(state[key].shape) != tuple(like.shape):
                raise ValueError(f"state['{key}']: expected shape {tuple(like.shape)}, got {tuple(state[key].shape)}")
        self.estimates = state["estimates"].to(torch.float64).clone()
        self.squares = state["squares"].to(torch.float64).clone()
        self.counts = state["counts"].to(torch.int64).clone()
        self.gains = state["gains"].to(torch.float64).clone()
        self.scale = torch.as_tensor(state["scale"], dtype=torch.float64).clone()
        self.generator.set_state(state["generator"])
        self._before_step = None
