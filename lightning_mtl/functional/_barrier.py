"""The damped-Newton barrier solver of Nash-MTL and FairGrad: ``Qx = x^(−power)`` with ``x > 0``."""

from __future__ import annotations

import torch
from torch import Tensor


def solve_power_barrier(
    Q: Tensor,
    x0: Tensor,
    power: float,
    *,
    max_iter: int,
    tol: float,
) -> tuple[Tensor, bool]:
    """Solve ``Qx = x^(−power)`` (elementwise, ``x > 0``) by damped Newton on a strictly convex function.

    The equation is the stationarity condition of ``f(x) = ½xᵀQx + Σ h(xᵢ)`` with ``h'(x) = −x^(−power)``
    (``h = −log`` for ``power = 1``: Nash-MTL; ``power = 1/α``: FairGrad). It starts from the best multiple
    of ``x0``; each step solves ``(Q + diag(h''(x))) d = −∇f``, never leaves ``x > 0`` (at most 99 % of the
    way to the boundary) and backtracks until Armijo's condition holds. Converged when
    ``maxᵢ |xᵢ^power·(Qx)ᵢ − 1| ≤ tol`` (relative, independent of the scale of ``Q``); one more full Newton
    step then polishes the solution when it lowers that violation.

    ``Q`` is expected normalised (``tr Q = 1``, as the callers do): the cap on the iterates (``1e15``) and
    the line search's rounding allowance are in those units.

    Returns ``(x, converged)``; when no solution exists (a zero gradient, or a non-negative combination of
    the gradients summing to zero) the iterates grow along that direction and ``converged`` is ``False``.
    """

    def h(v: Tensor) -> Tensor:
        if power == 1.0:
            return -torch.log(v)
        return -v.pow(1.0 - power) / (1.0 - power)

    def objective(v: Tensor) -> float:
        return float(0.5 * v @ Q @ v + h(v).sum())

    def newton_direction(v: Tensor, residual: Tensor) -> Tensor | None:
        hessian = Q + torch.diag(power * v.pow(-power - 1.0))
        try:
            d = -torch.linalg.solve(hessian, residual)
        except RuntimeError:  # pragma: no cover - singular only through overflow
            return None
        return d if bool(torch.isfinite(d).all()) else None

    def violation(v: Tensor) -> float:
        # Scale-free: vᵢ^power·(Qv)ᵢ = 1 at the solution, whereas along a direction without a solution
        # (Qv → 0 as v grows) the plain residual Qv − v^(−power) would vanish too.
        return float((v.pow(power) * (Q @ v) - 1).abs().max())

    # Start from the best multiple of x0: argmin over s > 0 of f(s·x0), in closed form.
    curvature = float(x0 @ Q @ x0)
    x = (
        x0 * (float(x0.pow(1.0 - power).sum()) / curvature) ** (1.0 / (1.0 + power))
        if curvature > 0
        else x0.clone()
    )
    for it in range(max_iter + 1):
        residual = Q @ x - x.pow(-power)
        norm = violation(x)
        if norm <= tol:
            # One more full Newton step (quadratic convergence): results then agree far below tol.
            d = newton_direction(x, residual)
            if d is not None and bool((x + d > 0).all()):
                polished = x + d
                if violation(polished) < norm:
                    x = polished
            return x, True
        if it == max_iter or float(x.max()) > 1e15:
            break
        d = newton_direction(x, residual)
        if d is None:
            break
        shrinking = d < 0
        t = 1.0
        if bool(shrinking.any()):
            t = min(1.0, 0.99 * float((-x[shrinking] / d[shrinking]).min()))
        f0, slope = objective(x), float(residual @ d)
        rounding = 1e-12 * (1.0 + abs(f0))  # near the solution the decrease is below f's rounding
        while t > 1e-12:
            trial = x + t * d
            f1 = objective(trial)
            if f1 <= f0 + 1e-4 * t * slope or (f1 <= f0 + rounding and violation(trial) < norm):
                break
            t *= 0.5
        x = x + t * d
    return x, False
