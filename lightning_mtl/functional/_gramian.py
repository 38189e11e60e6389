"""Shared helpers of the gradient methods: Gramian, validation, small solvers.

Every solver here works on a ``T×T`` problem (``T`` tasks), on the CPU and in float64, whatever the device
and dtype of the caller's Gramian: the cost is independent of the number of parameters, and the result is
bit-for-bit the same on every process of a distributed run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_F64 = torch.float64
_CPU = torch.device("cpu")


def gramian(J: Tensor) -> Tensor:
    """Gramian ``G = J Jᵀ`` (``[T, T]``) of a Jacobian ``J`` (``[T, P]``, one row per task)."""
    check_jacobian(J)
    return J @ J.T


def check_jacobian(J: Tensor, method: str = "this method") -> None:
    """Raise a ``ValueError`` unless ``J`` is a floating-point ``[T, P]`` tensor with ``T ≥ 1``."""
    if not isinstance(J, Tensor):
        raise TypeError(f"J must be a torch.Tensor for {method}, got {type(J).__name__}.")
    if J.ndim != 2 or J.shape[0] < 1:
        raise ValueError(f"J must be a [T, P] tensor with T >= 1 for {method}, got shape {tuple(J.shape)}.")
    if not J.is_floating_point():
        raise ValueError(f"J must be floating point for {method}, got dtype {J.dtype}.")


def prepare_gramian(G: Tensor, method: str, *, grouped: bool = False) -> Tensor:
    """Validate a Gramian and return a detached, symmetrised float64 copy on the CPU.

    Accepts ``[T, T]`` (and, with ``grouped=True``, ``[K, T, T]``: one Gramian per parameter group).
    Non-finite entries raise a ``ValueError`` naming ``method``.
    """
    if not isinstance(G, Tensor):
        raise TypeError(f"G must be a torch.Tensor for {method}, got {type(G).__name__}.")
    ndims = (2, 3) if grouped else (2,)
    if G.ndim not in ndims or G.shape[-1] != G.shape[-2] or G.shape[-1] < 1:
        expected = "[T, T] or [K, T, T]" if grouped else "[T, T]"
        raise ValueError(
            f"G must be a square {expected} Gramian with T >= 1 for {method}, got shape {tuple(G.shape)}."
        )
    if not G.is_floating_point():
        raise ValueError(f"G must be floating point for {method}, got dtype {G.dtype}.")
    G64 = G.detach().to(device=_CPU, dtype=_F64)
    if not bool(torch.isfinite(G64).all()):
        raise ValueError(
            f"G must be finite for {method}, got non-finite entries (overflow or NaN gradients?)."
        )
    return (G64 + G64.transpose(-1, -2)) / 2


def normalize_by_trace(G64: Tensor) -> tuple[Tensor, float]:
    """``(G / tr G, tr G)``; a zero Gramian (all gradients zero) gives ``(0, 0.0)``."""
    trace = float(G64.diagonal().sum())
    if not trace > 0.0:
        return torch.zeros_like(G64), 0.0
    return G64 / trace, trace


def psd_part(G64: Tensor) -> Tensor:
    """Nearest positive semi-definite matrix: negative eigenvalues set to zero.

    A Gramian computed in float32 is indefinite at the level of its rounding (eigenvalues down to about
    ``−1e-7·tr G``), enough to make the small convex problems of MGDA, CAGrad, Nash-MTL, FairGrad (and,
    in half precision, UPGrad) non-convex; this removes that noise and nothing else.
    """
    eigenvalues, V = torch.linalg.eigh(G64)
    if bool((eigenvalues >= 0).all()):
        return G64
    G_psd = (V * eigenvalues.clamp_min(0)) @ V.T
    return (G_psd + G_psd.T) / 2


def as_output(weights64: Tensor, like: Tensor) -> Tensor:
    """Cast solver output back to the caller's dtype and device."""
    return weights64.to(device=like.device, dtype=like.dtype)


def input_eps(G: Tensor) -> float:
    """Machine epsilon of the caller's dtype: the relative noise level of its Gramian."""
    return torch.finfo(G.dtype).eps


def check_generator(generator: torch.Generator | None, method: str) -> None:
    """Random draws happen on the CPU, so that a seeded generator gives the same draw on every process."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator for {method} (draws are made on the CPU so that they "
            f"match across devices), got one on {generator.device}."
        )


def preference_vector(
    preference: Tensor | Sequence[float] | None, T: int, method: str, default: float
) -> Tensor:
    """Validated float64 preference vector ``[T]`` (``default`` everywhere when ``None``)."""
    if preference is None:
        return torch.full((T,), default, dtype=_F64)
    p = torch.as_tensor(preference).detach().to(device=_CPU, dtype=_F64)
    if p.shape != (T,):
        raise ValueError(f"preference must have shape [{T}] for {method}, got shape {tuple(p.shape)}.")
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"preference must be finite for {method}, got {p.tolist()}.")
    return p


def check_positive_int(value: int, name: str, method: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer for {method}, got {value!r}.")


def check_positive_float(value: float, name: str, method: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0 for {method}, got {value!r}.")


def cap_update_norm(weights: Tensor, G: Tensor, max_norm: float) -> Tensor:
    """Rescale ``weights`` so that the update ``Jᵀw`` has norm at most ``max_norm``.

    ``‖Jᵀw‖ = √(wᵀGw)``, so this is the ``clip_grad_norm_(shared_parameters, max_norm)`` step of the Nash-MTL
    and FairGrad authors' code (the CAGrad authors do not clip), done on the Gramian. Note that the authors
    clip the *shared* gradient only; scaling the weights also scales the task-specific heads' gradients.
    """
    check_positive_float(max_norm, "max_norm", "cap_update_norm")
    G64 = prepare_gramian(G, "cap_update_norm")
    w = weights.detach().to(device=_CPU, dtype=_F64)
    norm = math.sqrt(max(float(w @ G64 @ w), 0.0))
    if norm <= max_norm:
        return weights
    return weights * (max_norm / norm)


def solve_bounded_qp(
    Q: Tensor,
    q: Tensor,
    lower: Tensor,
    *,
    free: Tensor | None = None,
    max_iter: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Solve ``argmin_x ½xᵀQx + qᵀx`` subject to ``x ≥ lower``, for each row of ``q`` and ``lower``.

    A primal active-set method (Nocedal & Wright, *Numerical Optimization*, Algorithm 16.3), batched over
    the rows: each iteration solves the equality-constrained problem on the current free set of every row
    with one batched linear solve, then either stops at the first constraint that blocks the step or, at
    the subproblem's minimiser, frees the bound with the most negative multiplier. Exact (up to rounding)
    and finite for ``Q`` positive definite; ``T ≤ 40`` variables take a few milliseconds.

    Args:
        Q: ``[T, T]`` symmetric positive definite, float64.
        q: ``[B, T]`` linear terms.
        lower: ``[B, T]`` lower bounds.
        free: optional ``[B, T]`` bool warm start (indices expected off their bound).
        max_iter: iteration cap (default ``20·T + 50``); a row that hits it returns its last feasible iterate.

    Returns:
        ``(x, free)``: the solutions ``[B, T]`` and their final free sets (to warm-start a nearby problem).
    """
    B, T = lower.shape
    if max_iter is None:
        max_iter = 20 * T + 50
    eye = torch.eye(T, dtype=Q.dtype)
    free = torch.zeros(B, T, dtype=torch.bool) if free is None else free.clone()
    free = _guess_free_set(Q, q, lower, free, eye)
    x = lower.clone()
    done = torch.zeros(B, dtype=torch.bool)
    q_scale = q.abs().amax(dim=1) if T > 0 else q.new_zeros(B)
    q_norm = float(Q.abs().max())
    for _ in range(max_iter):
        rows = (~done).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        xb, fb, lb, qb = x[rows], free[rows], lower[rows], q[rows]
        y = _solve_on_free_set(Q, qb, lb, fb, eye)
        if not bool(torch.isfinite(y).all()):
            done[rows] = True  # cannot happen for Q positive definite; keep the last feasible iterate
            break
        scale = 1.0 + lb.abs().amax(dim=1, keepdim=True) + y.abs().amax(dim=1, keepdim=True)
        blocking = fb & (y < lb - 1e-13 * scale)
        step = y - xb
        safe = torch.where(blocking, step, torch.full_like(step, -1.0))
        ratio = torch.where(blocking, (lb - xb) / safe, torch.full_like(step, math.inf))
        alpha, j = ratio.min(dim=1)
        full = ~blocking.any(dim=1)
        alpha = alpha.clamp(0.0, 1.0)
        xnew = torch.where(full[:, None], y, xb + alpha[:, None] * step)
        part = (~full).nonzero().squeeze(1)
        if part.numel():
            xnew[part, j[part]] = lb[part, j[part]]
            fb[part, j[part]] = False
        # At the subproblem's minimiser: optimal unless an active bound has a negative multiplier.
        grad = xnew @ Q + qb
        multipliers = torch.where(fb, torch.full_like(grad, math.inf), grad)
        lam_min, k = multipliers.min(dim=1)
        tol = 1e-11 * (1.0 + q_scale[rows] + q_norm * xnew.abs().amax(dim=1))
        optimal = full & (lam_min >= -tol)
        release = (full & ~optimal).nonzero().squeeze(1)
        if release.numel():
            fb[release, k[release]] = True
        x[rows] = xnew
        free[rows] = fb
        done[rows] = optimal
    return torch.maximum(x, lower), free


def _solve_on_free_set(Q: Tensor, q: Tensor, lower: Tensor, free: Tensor, eye: Tensor) -> Tensor:
    """Minimiser of ``½xᵀQx + qᵀx`` over the free variables, the others fixed at their bound (batched)."""
    m = free.to(Q.dtype)
    K = Q * (m[:, :, None] * m[:, None, :]) + eye * (1 - m)[:, None, :]
    rhs = torch.where(free, -q - (lower * (1 - m)) @ Q, lower)
    return torch.linalg.solve(K, rhs)


def _guess_free_set(Q: Tensor, q: Tensor, lower: Tensor, free: Tensor, eye: Tensor) -> Tensor:
    """Primal-dual active-set rounds (Hintermüller, Ito, Kunisch 2002) to guess the optimal free sets.

    Each round re-solves the rows whose guess changed; most rows settle after 2–5 rounds. The method can
    cycle when ``Q`` is not an M-matrix, so the rounds are capped: the primal active-set method that
    follows checks every guess and finishes the job, so a wrong guess only costs iterations.
    """
    free = free.clone()
    rows = torch.arange(free.shape[0])
    for _ in range(4 + free.shape[1] // 2):
        y = _solve_on_free_set(Q, q[rows], lower[rows], free[rows], eye)
        if not bool(torch.isfinite(y).all()):
            free[rows] = False
            break
        current = free[rows]
        multipliers = torch.where(current, torch.zeros_like(y), y @ Q + q[rows])
        new_free = multipliers < y - lower[rows]  # active where the multiplier outweighs the slack
        changed = (new_free != current).any(dim=1)
        free[rows] = new_free
        rows = rows[changed]
        if rows.numel() == 0:
            break
    return free


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


def randperms(n: int, count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` independent permutations of ``range(n)``, drawn in order from ``generator`` (CPU)."""
    if count == 0:
        return torch.zeros(0, n, dtype=torch.long)
    return torch.stack([torch.randperm(n, generator=generator) for _ in range(count)])
