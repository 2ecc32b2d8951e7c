"""Certificates of the Neumann solver (docs/hypergrad.md, "certificate").

With ``x = alpha * (v_0 + ... + v_{K-1})`` the residual is exact and free:
``v_0 - H x = v_K``. When ``H - damping I`` is positive semidefinite,
``lambda_min(H) >= damping`` and ``||x - H^{-1} v_0|| <= ||v_K|| / damping``.
"""

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class Certificate:
    """What a Neumann solve guarantees. ``certified`` is True only when every
    condition of the bound holds; otherwise ``reason`` says which failed."""

    certified: bool
    reason: str  # "" when certified, else why not ("; "-separated)
    curvature: str  # "ggn", "hessian", "psd (assumed)" or "general"
    iterations: int  # Neumann iterations run (matrix-vector products after the power iteration)
    a_priori_iterations: int | None  # iterations that provably reach tol (None: no a-priori bound)
    lambda_max: float  # power-iteration estimate of the largest eigenvalue of A + damping I (nan: alpha given)
    alpha: float  # the step
    rho: float  # 1 - alpha * damping: the contraction factor of the a-priori bound
    damping: float
    residual_ratio: float  # ||v_0 - H x|| / ||v_0||
    error_bound: float  # bound on ||x - H^{-1} v_0||; inf when none holds
    min_rayleigh: float  # smallest <v, H v> / ||v||^2 seen (power and Neumann iterations)
    hypergradient_bound: float = math.inf  # bound on ||g - g*|| (set by implicit_hypergradient)
    # the last power-iteration vector, structured like v (pass it as power_init to warm-start); () without one
    eigvec: object = dataclasses.field(default=(), repr=False, compare=False)


def a_priori_iterations(rho, tol):
    """Smallest K with rho^K <= tol (the residual bound ||v_K|| <= rho^K ||v_0||), or None."""
    if not 0.0 < rho < 1.0:
        return 0 if rho == 0.0 else None
    return max(0, math.ceil(math.log(tol) / math.log(rho)))


class Trace:
    """Reads the per-iteration statistics ``(||v_{j+1}||^2, <v_j, H v_j>)`` and
    decides when the loop stops: tolerance reached, growth of the residual
    (divergence) or a negative Rayleigh quotient. Rows read after the stop
    (the rest of a block of iterations) count as iterations but decide nothing."""

    def __init__(self, v0_norm, tol, dtype, lambda_max):
        eps = torch.finfo(dtype).eps
        self.v0_norm = v0_norm
        self.target = tol * v0_norm
        self.growth = math.sqrt(eps)  # a PSD series with a valid step never grows beyond rounding
        self.curvature_floor = -64 * eps * abs(lambda_max)  # Rayleigh quotients below this are negative
        self.iterations = 0
        self.norm = v0_norm
        self.min_rayleigh = math.inf
        self.stopped = False
        self.problems = []

    def feed(self, rows):
        """Consumes rows (float64 array of shape (k, 2)); returns True once the loop should stop."""
        for sq, vhv in rows.tolist():
            previous, self.norm = self.norm, math.sqrt(sq) if sq >= 0 else math.nan
            self.iterations += 1
            if self.stopped:
                continue
            if not (math.isfinite(self.norm) and math.isfinite(vhv)):
                self._stop(f"the series diverged (non-finite values at iteration {self.iterations})")
                continue
            if previous > 0:
                self.min_rayleigh = min(self.min_rayleigh, vhv / previous**2)
                if vhv / previous**2 < self.curvature_floor:
                    self._stop(f"negative Rayleigh quotient {vhv / previous**2:.3g} at iteration {self.iterations}")
                    continue
            if self.norm <= self.target:
                self.stopped = True
            elif self.norm > previous * (1 + self.growth):
                self._stop(f"the series diverges: the residual grew at iteration {self.iterations} "
                           f"({previous:.3g} -> {self.norm:.3g}); the step is too large or the matrix is not PSD")
        return self.stopped

    def _stop(self, problem):
        self.problems.append(problem)
        self.stopped = True


def build(trace, *, psd, curvature, tol, max_iter, lambda_max, alpha, damping, power_min_rayleigh, eigvec):
    """The certificate of a finished loop."""
    min_rayleigh = min(trace.min_rayleigh, power_min_rayleigh)
    problems = list(trace.problems)
    if power_min_rayleigh < trace.curvature_floor:
        problems.append(f"negative Rayleigh quotient {power_min_rayleigh:.3g} in the power iteration")
    negative = min_rayleigh < trace.curvature_floor
    residual_ratio = trace.norm / trace.v0_norm
    if not psd:
        problems.append("the curvature is not known to be PSD (pass assume_psd=True if it is): no error bound")
    elif damping == 0.0:
        problems.append("damping is 0: no lower bound on the smallest eigenvalue, so no error bound")
    if not trace.problems and not residual_ratio <= tol:
        problems.append(f"tolerance {tol:g} not reached in {max_iter} iterations (residual ratio {residual_ratio:.3g})")
    # growth or negative curvature may mean the PSD assumption is false: then no bound is claimed
    bound_holds = psd and damping > 0.0 and not trace.problems and not negative
    rho = 1.0 - alpha * damping
    return Certificate(
        certified=not problems,
        reason="; ".join(problems),
        curvature=curvature,
        iterations=trace.iterations,
        a_priori_iterations=a_priori_iterations(rho, tol) if psd and damping > 0.0 else None,
        lambda_max=lambda_max,
        alpha=alpha,
        rho=rho,
        damping=damping,
        residual_ratio=residual_ratio,
        error_bound=trace.norm / damping if bound_holds else math.inf,
        min_rayleigh=min_rayleigh,
        eigvec=eigvec,
    )
