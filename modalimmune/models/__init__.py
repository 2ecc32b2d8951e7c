"""Ready models following the model contract (docs/benchmark.md, "Models"), built by name."""

from ..checks import integer
from .base import ModalImmuneModel, pool
from .ensemble import UnimodalEnsemble
from .late_fusion import LateFusionMLP
from .transformer import FusionTransformer

MODELS = {"mlp": LateFusionMLP, "transformer": FusionTransformer, "ensemble": UnimodalEnsemble}


def build_model(name, spec, num_outputs, **options):
    """A ready model for a dataset's ``spec`` (``{name: ModalitySpec}``) with ``num_outputs`` outputs:
    ``dataset.num_outputs``, the class count, or 1 for regression."""
    if name not in MODELS:
        raise ValueError(f"model: unknown {name!r}; expected one of {', '.join(MODELS)}")
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"spec: expected a non-empty dict of modality specs, got {spec!r}")
    integer("num_outputs", num_outputs, 1)
    return MODELS[name](spec, num_outputs, **options)


def model_name(model):
    """The registry name of a ready model (None for a user's own module)."""
    return next((name for name, cls in MODELS.items() if type(model) is cls), None)


__all__ = ["ModalImmuneModel", "LateFusionMLP", "FusionTransformer", "UnimodalEnsemble", "MODELS", "build_model",
           "model_name", "pool"]
