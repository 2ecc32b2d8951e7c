"""ModalImmune: fused kernels and a trainer for multimodal models that keep
working when a modality is missing or corrupted (see docs/)."""

from . import _extension
from .backend import backends

_extension.load()  # warns once here when the compiled extension is unusable

from . import data, encoders, hypergrad, methods, models, ops  # methods: registers every method
from .comparison import compare
from .eval import evaluate
from .methods import CurvatureMasker, InfoGainController, ModalImmune
from .train import TrainConfig, Trainer

__version__ = "0.1.0"
__all__ = ["backends", "ops", "hypergrad", "data", "encoders", "models", "methods", "CurvatureMasker",
           "InfoGainController", "ModalImmune", "Trainer", "TrainConfig", "evaluate", "compare", "__version__"]
