"""Trainer, its config, checkpoints and the registry of training methods."""

from . import checkpoint, distributed
from .config import TrainConfig
from .methods import METHODS, Method, StepContext, build_method, parse_method, register_method
from .trainer import NonFiniteError, Trainer, load_model, seed_everything

__all__ = ["checkpoint", "distributed", "NonFiniteError", "TrainConfig", "METHODS", "Method", "StepContext", "build_method", "parse_method",
           "register_method", "Trainer", "load_model", "seed_everything"]
