"""CurvatureMasker: curvature-aware masking of destructive gradients (docs/method.md, "Masking";
docs/method_training.md, "Training step").

Holds the diagonal curvature EMA D of every parameter, refreshes it with a
Hutchinson probe u * (H u) of the *clean* loss (u Rademacher, one Hessian-vector
product) every ``probe_every`` steps, and applies :func:`modalimmune.ops.curvature_mask_`
with tau the ``quantile`` of |D| read off the previous pass's histogram (one step
late, so that the whole update stays one pass over memory). :meth:`CurvatureMasker.step`
is the whole masked step, the one the ModalImmune method runs.
"""

import torch

from ... import checks
from ...ops import curvature_mask as _op
from ..base import accumulate_grads

# tau before any curvature has been measured: every coordinate counts as flat
_TAU_UNKNOWN = float(torch.finfo(torch.float32).max)


class CurvatureMasker:
    def __init__(self, params, *, quantile=0.9, beta=0.99, probe_every=10, mode="hard", backend="auto", seed=0):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params: expected at least one parameter that requires grad")
        self.quantile = checks.number("quantile", quantile, 0.0, 1.0)
        self.beta = checks.number("beta", beta, 0.0, 1.0, high_open=True)
        self.probe_every = checks.integer("probe_every", probe_every, 0)  # 0: never probe
        self.mode = checks.choice("mode", mode, _op.MODES)
        self.backend = backend
        self.curvature = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        self.tau = _TAU_UNKNOWN
        self.steps = 0
        self._before_step = None  # what the current optimizer step changed, as it was before (settle)
        self.generator = torch.Generator(device=self.params[0].device).manual_seed(seed)

    def probe_due(self):
        """Whether this step draws a Hutchinson probe."""
        return self.probe_every > 0 and self.steps % self.probe_every == 0

    def hutchinson(self, grads):
        """u * (H u) for a fresh Rademacher u, from ``grads`` of the loss built with
        ``create_graph=True`` (one Hessian-vector product)."""
        u = [torch.randint(0, 2, p.shape, generator=self.generator, device=p.device).to(p.dtype).mul_(2).sub_(1)
             for p in self.params]
        hu = torch.autograd.grad(grads, self.params, grad_outputs=u, retain_graph=True, allow_unused=True)
        return [(ui * h).float() if h is not None else torch.zeros_like(c) for ui, h, c in zip(u, hu, self.curvature)]

    def apply(self, grads_clean, grads_destr, probe=None):
        """g_c <- g_c + M * g_d in place (one fused pass); updates D and tau."""
        self._journal(probe is not None)
        stats = _op.curvature_mask_(grads_clean, grads_destr, self.curvature, probe,
                                    beta=self.beta, tau=self.tau, mode=self.mode, backend=self.backend)
        if probe is not None:  # D moved: the next step's tau comes from this histogram
            self.tau = _op.quantile_from_hist(stats.log_abs_hist, self.quantile)
        self.steps += 1
        return stats

    def step(self, clean, destructive, reduce=None, *, grad_scale=1.0):
        """The masked step: adds ``grad_scale * (g_c + M * g_d)`` into each parameter's ``.grad``
        (as ``backward`` would), g_c the gradient of the ``clean`` loss and g_d that of the
        ``destructive`` part. When a probe is due, the Hessian probed is the clean loss's: the mask
        shields the coordinates where a destructive step would raise the clean loss most, and a
        step ``delta`` along coordinate i costs the clean loss about ``g_c,i delta + H_ii delta^2 / 2``
        with H the clean Hessian (docs/method_training.md, "Training step"). ``reduce`` (e.g.
        ``StepContext.reduce_mean`` under data parallelism) is applied to g_c, g_d and the probe
        together before the mask decides, so that every rank masks alike.
        Returns the :class:`~modalimmune.ops.MaskStats` of the pass (tensors: no host sync)."""
        probe_due = self.probe_due()
        g_c = torch.autograd.grad(clean, self.params, retain_graph=True, create_graph=probe_due, allow_unused=True)
        probe = None
        if probe_due:
            probe = self.hutchinson([p * 0 if g is None else g for g, p in zip(g_c, self.params)])
        g_d = torch.autograd.grad(destructive, self.params, allow_unused=True)
        g_c, g_d = ([torch.zeros_like(p) if g is None else g.detach().contiguous() for g, p in zip(gs, self.params)]
                    for gs in (g_c, g_d))
        if reduce is not None:
            reduce(g_c + g_d + (probe or []))
        stats = self.apply(g_c, g_d, probe)
        accumulate_grads(self.params, g_c, grad_scale)
        return stats

    def _journal(self, curvature_changes):
        """Remembers tau, the step count and (when a probe will change it) D as they were before
        this optimizer step's first change; D is copied only on the steps that probe."""
        if self._before_step is None:
            self._before_step = {"tau": self.tau, "steps": self.steps, "curvature": None}
        if curvature_changes and self._before_step["curvature"] is None:
            self._before_step["curvature"] = [d.clone() for d in self.curvature]

    def settle(self, applied):
        """End of an optimizer step: keeps its changes (``applied``) or undoes them (a skipped step,
        whose non-finite probe must not enter D)."""
        before, self._before_step = self._before_step, None
        if applied or before is None:
            return
        self.tau, self.steps = before["tau"], before["steps"]
        if before["curvature"] is not None:
            torch._foreach_copy_(self.curvature, before["curvature"])

    def state_dict(self):
        return {"curvature": [d.clone() for d in self.curvature], "tau": self.tau, "steps": self.steps,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        curvature = state["curvature"]
        if len(curvature) != len(self.curvature):
            raise ValueError(f"state['curvature']: expected {len(self.curvature)} tensors, got {len(curvature)}")
        for i, (mine, theirs) in enumerate(zip(self.curvature, curvature)):
            if mine.shape != theirs.shape:
                checks.fail(f"state['curvature'][{i}]", f"shape {tuple(mine.shape)}", f"{tuple(theirs.shape)}")
        for mine, theirs in zip(self.curvature, curvature):
            mine.copy_(theirs)
        self.tau = float(state["tau"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        self._before_step = None
