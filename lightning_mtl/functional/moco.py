"""MoCo: stochastic multi-objective gradient correction (Fernando et al., ICLR 2023).

Pure math on the Jacobian ``J`` (``[T, P]``) of the shared parameters; the state (the tracked gradients ``Y``,
the weights ``λ`` and the step count ``k``) is passed in and returned, never mutated.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_mtl.functional._simplex import project_onto_simplex

from ._checks import check_jacobian
from ._gramian import gramian

_METHOD = "MoCo"
_F64 = torch.float64
_CPU = torch.device("cpu")

MoCoNormalization = Literal["none", "loss_norm"]
MoCoProjection = Literal["simplex", "softmax"]
NORMALIZATIONS: tuple[str, ...] = ("none", "loss_norm")
PROJECTIONS: tuple[str, ...] = ("simplex", "softmax")
#: guard of ``‖gᵢ‖`` in the ``"loss_norm"`` normalisation (LibMTL's)
NORM_EPS = 1e-8


class MoCoState(NamedTuple):
    """What :func:`moco_step` carries from one step to the next (identical on every DDP rank)."""

    tracked: Tensor
    """``Y [T, P]``: row ``i`` tracks task ``i``'s gradient (the paper's ``yᵢ``), in ``J``'s dtype and on
    ``J``'s device."""
    lambdas: Tensor
    """``λ [T]`` (float64, CPU), on the simplex."""
    step: int
    """``k``: the number of updates taken (the step sizes of update ``k`` are ``β/k^σβ`` and ``γ/k^σγ``)."""


class MoCoResult(NamedTuple):
    """Result of :func:`moco_step`."""

    direction: Tensor
    """``[P]`` the shared update ``Yᵀλ`` (new ``Y``, new ``λ``), in ``J``'s dtype and on its device."""
    weights: Tensor
    """``[T]`` the new ``λ`` (float64, CPU), summing to 1."""
    state: MoCoState
    """The updated state, to pass back at the next step."""


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` (``[T]``) onto the probability simplex ``Δ = {λ ≥ 0, Σλ = 1}``.

    The sort-based algorithm (Held, Wolfe & Crowder 1974; Duchi, Shalev-Shwartz, Singer & Chandra, ICML 2008,
    Figure 1): with ``u`` the entries sorted in decreasing order and ``ρ`` the largest ``j`` such that
    ``uⱼ − (Σ_{r≤j} u_r − 1)/j > 0``, the projection is ``max(v − θ, 0)`` with ``θ = (Σ_{r≤ρ} u_r − 1)/ρ``.
    Exact (no iteration); same dtype and device as ``v``. The checked 1-D form of
    :func:`~lightning_mtl.functional.modo.project_onto_simplex` (batched, no host synchronisation).
    """
    if not isinstance(v, Tensor) or v.ndim != 1 or v.numel() < 1:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"project_simplex takes a 1-D tensor with at least one entry, got {shape}.")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"project_simplex takes a finite vector, got {v.tolist()}.")
    return project_onto_simplex(v)


def _check_number(value: float, name: str, *, low: float, low_open: bool, high: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise ValueError(f"{_METHOD} {name} must be a finite number {bound}, got {value!r}.")
    return float(value)


def check_moco_hyperparameters(
    beta: float,
    beta_sigma: float,
    gamma: float,
    gamma_sigma: float,
    rho: float,
    normalize: str,
    projection: str,
) -> tuple[float, float, float, float, float]:
    """Validate MoCo's hyper-parameters (``ValueError`` naming the argument and the value); return them as
    floats."""
    values = (
        _check_number(beta, "beta", low=0.0, low_open=True, high=1.0),
        _check_number(beta_sigma, "beta_sigma", low=0.0, low_open=False),
        _check_number(gamma, "gamma", low=0.0, low_open=True),
        _check_number(gamma_sigma, "gamma_sigma", low=0.0, low_open=False),
        _check_number(rho, "rho", low=0.0, low_open=False),
    )
    if normalize not in NORMALIZATIONS:
        raise ValueError(
            f"{_METHOD} normalize must be one of {NORMALIZATIONS}, got {normalize!r} ('loss_norm' is LibMTL's "
            "gᵢ ← Lᵢ·gᵢ/‖gᵢ‖)."
        )
    if projection not in PROJECTIONS:
        raise ValueError(
            f"{_METHOD} projection must be one of {PROJECTIONS}, got {projection!r} ('simplex' is the paper's "
            "Π_Δ, 'softmax' LibMTL's)."
        )
    return values


def loss_norm_gradients(J: Tensor, losses: Tensor) -> Tensor:
    """LibMTL's normalisation of MoCo's stochastic gradients: ``gᵢ ← Lᵢ·gᵢ/(‖gᵢ‖ + 1e-8)`` (each gradient's
    norm set to its loss)."""
    check_jacobian(J, _METHOD)
    L = _check_losses(losses, J.shape[0])
    norms = torch.linalg.vector_norm(J, dim=1)
    return J * (L.to(J) / (norms + NORM_EPS)).unsqueeze(1)


def _check_losses(losses: Tensor | None, T: int) -> Tensor:
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (T,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"{_METHOD} normalize='loss_norm' needs the task losses as a [{T}] tensor, got {shape}; pass losses=, "
            "or use normalize='none'."
        )
    return losses.detach()


def moco_step(
    J: Tensor,
    state: MoCoState | None = None,
    *,
    losses: Tensor | None = None,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
    normalize: MoCoNormalization = "none",
    projection: MoCoProjection = "simplex",
) -> MoCoResult:
    """One MoCo update: track the per-task gradients, take one projected step on ``λ``, return ``Yᵀλ``.

    Fernando, Shen, Liu, Chaudhury, Murugesan, Chen (2023), *Mitigating Gradient Bias in Multi-objective
    Learning: A Provably Convergent Approach*, ICLR, https://arxiv.org/abs/2210.12624 (arXiv v2: "... A Provably
    Convergent Stochastic Approach"). The paper's equation numbers were not verified here (its text was not
    reachable); the rule follows LibMTL's and the authors' code. With ``k`` the index of this update (1 at the
    first) and ``G = J`` (optionally normalised, see ``normalize``):

    1. ``Y ← Y − βₖ(Y − G)``, ``βₖ = β/k^σβ`` (the tracking of the true gradients; ``Y₀ = 0``);
    2. ``λ ← Π_Δ(λ − γₖ(YYᵀ + ρI)λ)``, ``γₖ = γ/k^σγ`` (one projected-gradient step on ``½λᵀ(YYᵀ + ρI)λ``,
       with the *new* ``Y``; ``λ₀ = 1/T``);
    3. the shared update is ``Yᵀλ`` (new ``Y``, new ``λ``).

    The order (``Y``, then ``λ`` with the new ``Y``, then ``Yᵀλ`` with the new ``λ``), ``Y₀ = 0`` and ``λ₀ = 1/T``
    are those of LibMTL's ``MoCo`` and of the authors' code (``heshandevaka/MoCo``, ``Tracking.py``;
    ``heshandevaka/Trade-Off-MOL``, ``MoCo.py``). Neither code projects ``yᵢ`` onto a bounded set (which the
    paper's analysis is recalled to use; not verified), nor does this function.

    Defaults are LibMTL's (``β = 0.5, σβ = 0.5, γ = 0.1, σγ = 0.5, ρ = 0``). The authors' ICLR code uses
    ``β = 0.1, σβ = 0.5, γ = 0.1, σγ = 0.5``, no ``ρ``, and the gradient ``2YYᵀλ`` of ``λᵀYYᵀλ`` (i.e. twice
    the ``γ`` here); their later fork uses constant ``β = γ = ρ = 0.1``.

    Args:
        J: ``[T, P]`` per-task gradients of the shared parameters (the step's stochastic gradients ``hᵢ``).
        state: the previous :class:`MoCoState` (``None``: ``Y = 0``, ``λ = 1/T``, ``k = 0``).
        losses: ``[T]`` task losses, needed by ``normalize="loss_norm"`` only.
        beta: ``β ∈ (0, 1]``, the tracking step (``β = 1, σβ = 0``: no tracking, ``Y = G``).
        beta_sigma: ``σβ ≥ 0``, decay exponent of ``βₖ``.
        gamma: ``γ > 0``, the ``λ`` step.
        gamma_sigma: ``σγ ≥ 0``, decay exponent of ``γₖ``.
        rho: ``ρ ≥ 0``, the ridge of the ``λ`` sub-problem.
        normalize: ``"none"`` (the paper) or ``"loss_norm"`` (LibMTL: ``gᵢ ← Lᵢ·gᵢ/(‖gᵢ‖ + 1e-8)`` before
            the tracking).
        projection: ``"simplex"`` (the paper's ``Π_Δ``, :func:`project_simplex`) or ``"softmax"`` (LibMTL
            replaces ``Π_Δ`` by a softmax of the same argument).

    Returns:
        :class:`MoCoResult` ``(direction, weights, state)``.
    """
    check_jacobian(J, _METHOD)
    beta, beta_sigma, gamma, gamma_sigma, rho = check_moco_hyperparameters(
        beta, beta_sigma, gamma, gamma_sigma, rho, normalize, projection
    )
    T = J.shape[0]
    G = J.detach() if normalize == "none" else loss_norm_gradients(J.detach(), losses)  # type: ignore[arg-type]
    if state is None:
        Y, lambdas, k = torch.zeros_like(G), torch.full((T,), 1.0 / T, dtype=_F64), 1
    else:
        _check_state(state, G)
        Y, lambdas, k = state.tracked.to(G), state.lambdas.to(device=_CPU, dtype=_F64), int(state.step) + 1
    Y = Y - (beta / k**beta_sigma) * (Y - G)
    M = gramian(Y).to(_CPU) + rho * torch.eye(T, dtype=_F64)
    argument = lambdas - (gamma / k**gamma_sigma) * (M @ lambdas)
    lambdas = project_simplex(argument) if projection == "simplex" else torch.softmax(argument, 0)
    direction = lambdas.to(Y) @ Y
    return MoCoResult(direction, lambdas, MoCoState(Y, lambdas, k))


def _check_state(state: MoCoState, J: Tensor) -> None:
    Y, lambdas = state.tracked, state.lambdas
    if not isinstance(Y, Tensor) or tuple(Y.shape) != tuple(J.shape):
        shape = tuple(Y.shape) if isinstance(Y, Tensor) else type(Y).__name__
        raise ValueError(
            f"{_METHOD} state.tracked must have J's shape {tuple(J.shape)}, got {shape} (the state belongs to "
            "another model or task set)."
        )
    if not isinstance(lambdas, Tensor) or tuple(lambdas.shape) != (J.shape[0],):
        shape = tuple(lambdas.shape) if isinstance(lambdas, Tensor) else type(lambdas).__name__
        raise ValueError(f"{_METHOD} state.lambdas must have shape [{J.shape[0]}], got {shape}.")
