"""Certified hypergradients: curvature-vector products, the Neumann solver
with its certificate, and implicit-function hypergradients (docs/hypergrad.md)."""

from .certificate import Certificate
from .hvp import GGNOperator, HessianOperator, ggn_vp, hvp
from .implicit import implicit_hypergradient
from .neumann import capture_stream, neumann_solve

__all__ = ["Certificate", "GGNOperator", "HessianOperator", "capture_stream", "ggn_vp", "hvp",
           "implicit_hypergradient", "neumann_solve"]
