"""Training methods (docs/method_training.md, "Methods"): the base class, the registry and the
step context in ``base``, the baselines in ``baselines``, ModalImmune in ``modalimmune``.
Importing this package registers every method."""

from . import baselines, modalimmune
from .base import (
                   METHODS,
                   Method,
                   MethodEnv,
                   StepContext,
                   build_method,
                   forward,
                   option_defaults,
                   parse_method,
                   register_method,
                   split_methods,
)
from .baselines import ERM, OGMGE, ModDrop
from .modalimmune import CurvatureMasker, InfoGainController, ModalImmune
from .runner import MethodRunner

__all__ = ["METHODS", "Method", "MethodEnv", "StepContext", "build_method", "forward", "option_defaults",
           "parse_method", "register_method", "split_methods", "baselines", "modalimmune", "ERM", "ModDrop",
           "OGMGE", "CurvatureMasker", "InfoGainController", "ModalImmune", "MethodRunner"]
