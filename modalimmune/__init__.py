"""ModalImmune: fused kernels and a trainer for multimodal models that keep
working when a modality is missing or corrupted (see docs/)."""

from . import _extension
from .backend import backends

_extension.load()  # warns once here when the compiled extension is unusable

from . import ops  # noqa: E402
from . import hypergrad  # noqa: E402
from .method.masker import CurvatureMasker  # noqa: E402
from . import data  # noqa: E402
from . import models  # noqa: E402
from .train import Trainer  # noqa: E402
from .train import TrainConfig  # noqa: E402
from .eval import evaluate  # noqa: E402
from .eval import compare  # noqa: E402
from .method.controller import InfoGainController  # noqa: E402
from .method.immune import ModalImmune  # noqa: E402  (registers method="modalimmune")

__version__ = "0.1.0"
__all__ = ["backends", "ops", "CurvatureMasker", "__version__"]
