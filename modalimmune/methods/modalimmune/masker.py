"""CurvatureMasker: curvature-aware masking of destructive gradients (docs/method.md, section "masking").

Holds the diagonal curvature EMA D of every parameter, refreshes it with a
Hutchinson probe u * (H u) (u Rademacher, one Hessian-vector product) every
``probe_every`` steps, and applies :func:`modalimmune.ops.curvature_mask_` with
tau the ``quantile`` of |D| read off the previous pass's histogram (one step
late, so that the whole update stays one pass over memory).
"""

import torch

from ..ops import curvature_mask as _op
from ..ops import _validate

# tau before any curvature has been measured: every coordinate counts as flat
_TAU_UNKNOWN = float(torch.finfo(torch.float32).max)


class CurvatureMasker:
    def __init__(self, params, *, quantile=0.9, beta=0.99, probe_every=10, mode="hard", backend="auto", seed=0):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params: expected at least one parameter that requires grad")
        self.quantile = _validate.finite_float("quantile", quantile, 0.0, 1.0)
        self.beta = _validate.finite_float("beta", beta, 0.0, 1.0, high_open=True)
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 0:
            raise ValueError(f"probe_every: expected an int >= 0 (0: never probe), got {probe_every!r}")
        self.probe_every = probe_every
        self.mode = _validate.choice("mode", mode, _op.MODES)
        self.backend = backend
        self.curvature = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        self.tau = _TAU_UNKNOWN
        self.steps = 0
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
        stats = _op.curvature_mask_(grads_clean, grads_destr, self.curvature, probe,
                                    beta=self.beta, tau=self.tau, mode=self.mode, backend=self.backend)
        if probe is not None:  # D moved: the next step's tau comes from this histogram
            self.tau = _op.quantile_from_hist(stats.log_abs_hist, self.quantile)
        self.steps += 1
        return stats

    def step(self, clean_loss, destr_loss):
        """Backpropagates both losses, masks g_d into g_c and stores the result in ``p.grad``.

        When a probe is due, the Hessian is that of ``clean_loss + destr_loss``.
        Returns the :class:`~modalimmune.ops.MaskStats` of the pass.
        """
        probe_due = self.probe_due()
        grad = lambda loss, keep: torch.autograd.grad(  # noqa: E731
            loss, self.params, create_graph=probe_due, retain_graph=keep, allow_unused=True)
        g_c = grad(clean_loss, True)
        g_d = grad(destr_loss, probe_due)
        probe = None
        if probe_due:
            total = [a if b is None else (b if a is None else a + b) for a, b in zip(g_c, g_d)]
            probe = self.hutchinson([t if t is not None else torch.zeros_like(p) for t, p in zip(total, self.params)])
        fill = lambda gs: [g.detach().contiguous() if g is not None else torch.zeros_like(p)  # noqa: E731
                           for g, p in zip(gs, self.params)]
        g_c, g_d = fill(g_c), fill(g_d)
        stats = self.apply(g_c, g_d, probe)
        for p, g in zip(self.params, g_c):
            p.grad = g
        return stats

    def state_dict(self):
        return {"curvature": [d.clone() for d in self.curvature], "tau": self.tau, "steps": self.steps,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        curvature = state["curvature"]
        if len(curvature) != len(self.curvature):
            raise ValueError(f"state['curvature']: expected {len(self.curvature)} tensors, got {len(curvature)}")
        for i, (mine, theirs) in enumerate(zip(self.curvature, curvature)):
            if mine.shape != theirs.shape:
                raise ValueError(f"state['curvature'][{i}]: expected shape {tuple(mine.shape)}, got {tuple(theirs.shape)}")
        for mine, theirs in zip(self.curvature, curvature):
            mine.copy_(theirs)
        self.tau = float(state["tau"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
