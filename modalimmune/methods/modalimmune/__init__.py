"""``method="modalimmune"``, split by job: ``options`` (validated once), ``controller`` (which
targets, how hard), ``interventions`` (the perturbed views), ``objective`` (clean and destructive
losses), ``masker`` (the masked gradient), ``tuner`` (the loss weights' hypergradient) and
``step`` (one training step that ties them together; docs/method_training.md)."""

from .controller import InfoGainController
from .interventions import Views, intervene
from .masker import CurvatureMasker
from .options import Options
from .step import ModalImmune
from .tuner import LambdaTuner

__all__ = ["CurvatureMasker", "InfoGainController", "LambdaTuner", "ModalImmune", "Options", "Views", "intervene"]
