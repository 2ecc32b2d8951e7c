"""Trainer, its config and checkpoints (the methods it runs: ``modalimmune.methods``)."""

from . import checkpoint
from .config import TrainConfig
from .trainer import PREEMPTED_EXIT_CODE, NonFiniteError, Preempted, SplitCycle, Trainer, load_model, seed_everything

__all__ = ["checkpoint", "PREEMPTED_EXIT_CODE", "NonFiniteError", "Preempted", "SplitCycle", "TrainConfig", "Trainer",
           "load_model", "seed_everything"]
