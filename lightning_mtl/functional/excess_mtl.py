"""ExcessMTL: task weights from excess risks (He et al., ICML 2024).

Pure math on the Jacobian ``J`` (``[T, P]``) of the shared parameters; the state is passed in and returned,
never mutated.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_jacobian

_METHOD = "ExcessMTL"
_F64 = torch.float64


class ExcessMTLState(NamedTuple):
    """What :func:`excess_mtl_step` carries from one step to the next (identical on every DDP rank)."""

    sq_grad_sum: Tensor
    """``S [T, P]``: the running sum of the squared per-task gradients ``Σ_τ gᵢ,τ²`` (the AdaGrad
    accumulator), in ``J``'s dtype (float32 or wider) and on ``J``'s device."""
    baseline: Tensor
    """``e⁰ [T]`` (float64, CPU): each task's first non-zero excess-risk estimate; ``0`` while unset."""
    log_weights: Tensor
    """``log w [T]`` (float64, CPU), normalised so that ``Σ exp(log w) = T``."""


class ExcessMTLResult(NamedTuple):
    """Result of :func:`excess_mtl_step`."""

    weights: Tensor
    """``[T]`` task weights ``exp(log w)``, summing to ``T`` (float64, CPU)."""
    state: ExcessMTLState
    """The updated state, to pass back at the next step."""
    excess: Tensor
    """``[T]`` this step's excess-risk estimates ``eᵢ`` (float64, CPU), before the scale processing."""
    relative_excess: Tensor
    """``[T]`` ``eᵢ / e⁰ᵢ`` (float64, CPU): what the exponentiated-gradient step used; ``0`` for a task whose
    baseline was set at this step or is still unset."""


def excess_risks(J: Tensor, sq_grad_sum: Tensor, eps: float = 1e-7) -> Tensor:
    """Excess-risk estimates ``eᵢ = gᵢᵀ diag(1/√(Sᵢ + ε)) gᵢ = Σ_p gᵢ,p² / √(Sᵢ,p + ε)`` (``[T]``, float64).

    ``S`` must already contain this step's ``gᵢ²`` (as in the authors' code, the accumulator is updated
    before it is used). No ``½`` (see :func:`excess_mtl_step`). Computed and summed in ``J``'s dtype.
    """
    check_jacobian(J, _METHOD)
    _check_eps(eps)
    if not isinstance(sq_grad_sum, Tensor) or tuple(sq_grad_sum.shape) != tuple(J.shape):
        shape = tuple(sq_grad_sum.shape) if isinstance(sq_grad_sum, Tensor) else type(sq_grad_sum).__name__
        raise ValueError(f"sq_grad_sum must have J's shape {tuple(J.shape)} for {_METHOD}, got {shape}.")
    return _excess(J.detach(), sq_grad_sum.detach().to(device=J.device, dtype=J.dtype), eps)


def _excess(J: Tensor, S: Tensor, eps: float) -> Tensor:
    """``Σ_p J²/√(S + ε)`` per row with one ``[T, P]`` temporary, in ``J``'s dtype, as float64 on the CPU: the
    row-wise dot product of ``J/√(S + ε)`` with ``J`` (one batched BLAS dot, faster than a multiply and a sum)."""
    scaled = S.add(eps).rsqrt_().mul_(J)
    return torch.bmm(scaled.unsqueeze(1), J.unsqueeze(2)).flatten().to(device="cpu", dtype=_F64)


def excess_mtl_step(
    J: Tensor,
    state: ExcessMTLState | None = None,
    *,
    robust_step_size: float = 1e-2,
    eps: float = 1e-7,
    inplace: bool = False,
) -> ExcessMTLResult:
    """One ExcessMTL update: accumulate ``S``, estimate the excess risks, take the exponentiated-gradient step.

    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi, Zhao (2024), *Robust Multi-Task Learning with Excess Risks*,
    ICML, https://arxiv.org/abs/2402.02009 (Equations 6-7: excess risk by a second-order Taylor expansion
    with an AdaGrad-style diagonal Hessian; Equation 9: exponentiated-gradient step on the task weights;
    Section 3.2, "scale processing": each task's excess risk divided by its initial one; equation and
    section numbers as cited by TorchJD 0.18's ``ExcessMTLWeighting``), following the authors' code
    (``yifei-he/ExcessMTL``, ``LibMTL/weighting/ExcessMTL.py``; identical in LibMTL):

    1. ``Sᵢ ← Sᵢ + gᵢ²`` (elementwise; ``gᵢ`` is row ``i`` of ``J``);
    2. ``eᵢ = Σ_p gᵢ,p² / √(Sᵢ,p + ε)`` (:func:`excess_risks`);
    3. the first time ``eᵢ > 0`` it becomes the baseline ``e⁰ᵢ`` and task ``i``'s weight does not move at that
       step (the authors' first call, which only stores ``e⁰``); afterwards ``rᵢ = eᵢ / e⁰ᵢ``;
    4. ``log wᵢ ← log wᵢ + η rᵢ``, then ``log w ← log w − logsumexp(log w) + log T`` (so ``Σ w = T``).

    Conventions (each differs from some reference; none changes the weights of the authors' code where those
    are finite):

    * **No ½.** A second-order expansion around the optimum gives ``Lᵢ(θ) − Lᵢ(θ*) ≈ ½ gᵢᵀHᵢ⁻¹gᵢ``; the
      authors' code (and TorchJD's note on Equation 6) has no ``½``. It cancels in ``eᵢ / e⁰ᵢ``: the weights
      are the same either way.
    * **Log weights.** The multiplicative update ``wᵢ ← wᵢ·exp(η rᵢ)``, ``w ← T·w/Σw`` is carried out on
      ``log w`` (float64) with a log-sum-exp normalisation: identical in exact arithmetic, but a long run
      (or a huge ``rᵢ``) saturates the weights at ``T`` and ``0`` instead of overflowing ``exp`` to
      ``inf``/``nan``. ``η rᵢ`` is capped at ``1e300`` so that it stays finite.
    * **Sum T.** The weights start at 1 and sum to ``T`` (the authors' code and LibMTL); the paper's
      weights live on the simplex (sum 1, as TorchJD keeps them): multiply those by ``T``.
    * **Baseline per task.** The authors store ``e⁰`` for every task at the first call. A task whose
      gradient is zero then (its loss does not reach the shared parameters, yet) would make ``rᵢ = eᵢ/0``
      infinite or NaN; here its baseline waits for its first non-zero ``eᵢ`` and until then ``rᵢ = 0``.
      When every ``e⁰ᵢ > 0`` at the first call this is exactly the authors' rule.
    * **First step, not first epoch.** The authors' flag is named ``first_epoch`` but is cleared after the
      first call: the baseline is the excess risk of the first step, and the weights stay 1 at that step
      (authors' code, LibMTL). TorchJD's ``ExcessMTLWeighting(n_warmup_steps=0)`` already moves its weights
      at the first call (by ``η eᵢ``, unnormalised); its ``n_warmup_steps=1`` is this rule (with weights
      summing to 1 and ``e⁰ᵢ + 1e-7`` in the denominator).

    Scale: multiplying task ``i``'s loss by ``c > 0`` multiplies ``gᵢ`` by ``c``, ``Sᵢ`` by ``c²``, ``eᵢ`` and
    ``e⁰ᵢ`` by ``c`` (up to ``ε``): the weights do not change. A task whose excess risk shrinks more slowly
    than the others' (relative to its own start) gains weight.

    Args:
        J: ``[T, P]`` Jacobian of the losses w.r.t. the shared parameters (one row per task).
        state: the previous :class:`ExcessMTLState`, or ``None`` for the first step (``S = 0``, no baselines,
            weights 1).
        robust_step_size: ``η > 0``, the step of the exponentiated-gradient ascent (default ``1e-2``, the
            authors' ``robust_step_size``).
        eps: ``ε > 0`` inside the square root (default ``1e-7``, the authors').
        inplace: add ``J²`` to ``state.sq_grad_sum`` in place (when it is on ``J``'s device, in ``J``'s dtype)
            instead of allocating a new ``S``: peak memory ``J``, ``S`` and one ``[T, P]`` temporary. The
            strategy uses it; by default the given state is left untouched.

    Returns:
        :class:`ExcessMTLResult` ``(weights, state, excess, relative_excess)``.
    """
    check_jacobian(J, _METHOD)
    _check_eps(eps)
    if isinstance(robust_step_size, bool) or not (
        isinstance(robust_step_size, (int, float))
        and math.isfinite(robust_step_size)
        and robust_step_size > 0
    ):
        raise ValueError(
            f"robust_step_size must be a finite number > 0 for {_METHOD}, got {robust_step_size!r} "
            "(the authors use 1e-2)."
        )
    T = J.shape[0]
    J = J.detach()
    if J.dtype not in (torch.float32, torch.float64):
        J = J.float()
    if state is None:
        S = J.square()
        baseline = torch.zeros(T, dtype=_F64)
        log_weights = torch.zeros(T, dtype=_F64)
    else:
        S_prev, baseline, log_weights = _check_state(state, J)
        if inplace and S_prev.device == J.device and S_prev.dtype == J.dtype:
            S = S_prev.addcmul_(J, J)
        else:
            S = torch.addcmul(S_prev.to(device=J.device, dtype=J.dtype), J, J)
    e = _excess(J, S, eps)
    if not bool(torch.isfinite(e).all()):
        raise ValueError(
            f"J must be finite for {_METHOD}: got inf/NaN excess risks {e.tolist()} (non-finite gradients; "
            "an AMP overflow?)."
        )
    unset = baseline <= 0
    new = unset & (e > 0)
    baseline = torch.where(new, e, baseline)
    ready = ~unset  # a baseline from an earlier step
    relative = torch.where(ready, e / torch.where(ready, baseline, 1.0), 0.0)
    log_weights = log_weights + (robust_step_size * relative).clamp(max=1e300)
    log_weights = log_weights - (torch.logsumexp(log_weights, dim=0) - math.log(T))
    new_state = ExcessMTLState(S, baseline, log_weights)
    return ExcessMTLResult(log_weights.exp(), new_state, e, relative)


def normalized_log_weights(log_weights: Tensor) -> Tensor:
    """``log w`` shifted so that ``Σ exp(log w) = T`` (float64, CPU)."""
    lw = log_weights.detach().to(device="cpu", dtype=_F64)
    return lw - (torch.logsumexp(lw, dim=0) - math.log(lw.numel()))


def _check_state(state: ExcessMTLState, J: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    T = J.shape[0]
    if not isinstance(state, tuple) or len(state) != 3:
        raise TypeError(
            f"state must be an ExcessMTLState (or None) for {_METHOD}, got {type(state).__name__}."
        )
    S, baseline, log_weights = state
    if not isinstance(S, Tensor) or tuple(S.shape) != tuple(J.shape):
        shape = tuple(S.shape) if isinstance(S, Tensor) else type(S).__name__
        raise ValueError(
            f"state.sq_grad_sum must have J's shape {tuple(J.shape)} for {_METHOD}, got {shape}: the state was "
            "built for other tasks or other shared parameters. Start from state=None."
        )
    for name, value in (("baseline", baseline), ("log_weights", log_weights)):
        if not isinstance(value, Tensor) or tuple(value.shape) != (T,):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"state.{name} must have shape ({T},) for {_METHOD}, got {shape}.")
    baseline = baseline.detach().to(device="cpu", dtype=_F64)
    log_weights = log_weights.detach().to(device="cpu", dtype=_F64)
    if bool((baseline < 0).any()) or not bool(torch.isfinite(baseline).all()):
        raise ValueError(f"state.baseline must be finite and >= 0 for {_METHOD}, got {baseline.tolist()}.")
    if bool(torch.isnan(log_weights).any()) or bool((log_weights == math.inf).any()):
        raise ValueError(
            f"state.log_weights must not be NaN or +inf for {_METHOD}, got {log_weights.tolist()}."
        )
    return S, baseline, log_weights


def _check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(
            f"eps must be a finite number > 0 for {_METHOD}, got {eps!r} (the authors use 1e-7)."
        )
