"""MethodRunner: any method in your own training loop (docs/own_loop.md).

One object set up with the model and its parameters; called once per micro-batch, it fills
``p.grad`` (scaled for gradient accumulation) and returns the method's figures; ``finish``
closes the optimizer step. The Trainer runs the same calls, so a loop written with it trains
the same parameters (tests/test_own_loop.py).
"""

from .. import checks
from .base import TASKS, Method, MethodEnv, StepContext, build_method


class MethodRunner:
    """``method``: a spec (``"modalimmune[mask=off]"``) or a :class:`Method`; ``params``: the
    trainable parameters (default: those of ``model`` that require grad); ``validation_batch``:
    a callable returning the next validation batch (ModalImmune's hypergradient needs it; e.g.
    :class:`modalimmune.train.SplitCycle`); ``grad_accum``: micro-batches per optimizer step;
    ``task``: the dataset's (``dataset.task``)."""

    def __init__(self, method, model, params=None, *, seed=0, validation_batch=None, grad_accum=1, rec_weight=0.0,
                 epochs=1, task="classification"):
        self.method = build_method(method) if isinstance(method, str) else method
        if not isinstance(self.method, Method):
            checks.fail("method", "a method spec or a Method", type(self.method).__name__, TypeError)
        self.grad_accum = checks.integer("grad_accum", grad_accum, 1)
        self.rec_weight = checks.number("rec_weight", rec_weight, 0.0)
        self.epochs = checks.integer("epochs", epochs, 1)
        self.model = model
        self.params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        if not self.params:
            checks.fail("params", "at least one parameter that requires grad", "none")
        self.method.check(model.modalities, checks.choice("task", task, TASKS))
        self.method.setup(model, MethodEnv(self.params, self.params[0].device, seed, validation_batch, task))
        self.step, self.epoch = 0, 0

    def __call__(self, batch, *, share=None, rows=None, global_rows=None):
        """One micro-batch: adds its gradient, scaled by ``share`` of the optimizer step (default
        ``1 / grad_accum``), into ``p.grad``; returns the method's figures (0-dim tensors). Under
        data parallelism ``rows`` is this rank's slice of a micro-batch of ``global_rows`` samples."""
        share = 1.0 / self.grad_accum if share is None else share
        ctx = StepContext(self.params, share, self.step, self.epoch, self.epochs, self.rec_weight, rows=rows,
                          global_rows=global_rows)
        return self.method.training_step(self.model, batch, ctx)

    def finish(self, applied=True):
        """Ends the optimizer step: ``applied`` False for a step you skipped (a non-finite loss or
        gradient), so that the method puts back what the step changed in its state."""
        self.method.finish_step(applied)
        self.step += 1

    def state_dict(self):
        return {"method": self.method.state_dict(), "step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.method.load_state_dict(state["method"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
