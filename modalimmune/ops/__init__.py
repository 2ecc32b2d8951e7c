"""The fused ops. Each takes ``backend="auto"|"torch"|"cpp"|"cuda"|"triton"``."""

from .curvature_mask import MaskStats, curvature_mask_, curvature_mask_reference, hist_edges, quantile_from_hist
from .effective_rank import effective_rank
from .lowrank_svd import lowrank_svd, lowrank_svd_reference
from .neumann_update import neumann_update_, neumann_update_reference
from .spectral_collapse import spectral_collapse

__all__ = ["MaskStats", "curvature_mask_", "curvature_mask_reference", "hist_edges", "quantile_from_hist",
           "effective_rank", "lowrank_svd", "lowrank_svd_reference",
           "neumann_update_", "neumann_update_reference", "spectral_collapse"]
