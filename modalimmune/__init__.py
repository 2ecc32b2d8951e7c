"""ModalImmune: fused kernels and a trainer for multimodal models that keep
working when a modality is missing or corrupted (see docs/)."""

from . import _extension
from .backend import backends

_extension.load()  # warns once here when the compiled extension is unusable

from . import ops  # noqa: E402
from .method.masker import CurvatureMasker  # noqa: E402

__version__ = "0.1.0"
__all__ = ["backends", "ops", "CurvatureMasker", "__version__"]
