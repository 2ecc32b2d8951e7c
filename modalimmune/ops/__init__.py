"""The fused ops. Each takes ``backend="auto"|"torch"|"cpp"|"cuda"|"triton"``."""

from .curvature_mask import MaskStats, curvature_mask_, curvature_mask_reference, hist_edges, quantile_from_hist

__all__ = ["MaskStats", "curvature_mask_", "curvature_mask_reference", "hist_edges", "quantile_from_hist"]
