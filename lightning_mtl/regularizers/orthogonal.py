"""Orthogonal gradients: a penalty on the squared cosines between the task gradients on the shared parameters."""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_mtl.gradients.sources import check_trainable, grad_scale, shared_parameters_of
from lightning_mtl.regularizers.base import MTLRegularizer
from lightning_mtl.step import StepContext

__all__ = ["OrthogonalGradients", "gradient_cosines", "orthogonality_penalty", "task_gramian"]

Reduction = Literal["sum", "mean"]


def task_gramian(losses: Tensor, params: list[Tensor], scale: float | None = None) -> Tensor:
    """The Gramian ``G[i, j] = ⟨gᵢ, gⱼ⟩`` (float32 or wider, ``[T, T]``) of the task gradients
    ``gᵢ = ∇_params losses[i]``, **attached to the graph** (``create_graph=True``): differentiable w.r.t. the
    model, so a penalty on it can be back-propagated (double backward).

    ``T`` calls of ``torch.autograd.grad`` (no DDP hook fires), each keeping its graph; the Gramian is summed
    parameter by parameter (no ``[T, P]`` concatenation). ``scale`` (the AMP loss scale) multiplies each loss
    before its backward and divides the gradients after (so fp16 gradients do not underflow). A parameter no
    loss reaches contributes nothing; a task that reaches none has a zero row and column.
    """
    if losses.ndim != 1:
        raise ValueError(f"task_gramian expects a 1-d tensor of T losses, got shape {tuple(losses.shape)}.")
    s = 1.0 if scale is None else float(scale)
    T = losses.shape[0]
    rows = [
        torch.autograd.grad(losses[i] * s, params, create_graph=True, retain_graph=True, allow_unused=True)
        for i in range(T)
    ]
    dtype = torch.promote_types(losses.dtype, torch.float32)
    G = losses.new_zeros((T, T), dtype=dtype)
    for j, p in enumerate(params):
        col = [r[j] for r in rows]
        if all(g is None for g in col):
            continue
        block = torch.stack(
            [(torch.zeros_like(p) if g is None else g).reshape(-1).to(dtype) for g in col]
        )  # [T, numel(p)]
        if s != 1.0:
            block = block / s
        G = G + block @ block.T
    return G


def gradient_cosines(gram: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosines ``cos(gᵢ, gⱼ) = G[i, j] / (‖gᵢ‖ ‖gⱼ‖)`` ``[T, T]`` from the Gramian, with each norm clamped below
    at ``eps``: a zero (or vanishing, ``‖gᵢ‖ < eps``) gradient has cosine 0 with every other one, and the cosines
    stay differentiable there (no ``0/0``, no infinite derivative of the square root)."""
    norms = gram.diagonal().clamp_min(eps * eps).sqrt()
    return gram / (norms[:, None] * norms[None, :])


def orthogonality_penalty(
    gram: Tensor, weight: float = 1.0, reduction: Reduction = "sum", eps: float = 1e-8
) -> Tensor:
    """``λ · Σ_{i<j} cos²(gᵢ, gⱼ)`` (``reduction="sum"``) or ``λ`` times the mean over the ``T(T−1)/2`` pairs
    (``"mean"``) from the Gramian ``gram`` ``[T, T]`` (see :func:`gradient_cosines`). 0 for ``T < 2``."""
    T = gram.shape[0]
    if T < 2:
        return gram.sum() * 0.0
    cos = gradient_cosines(gram, eps)
    iu = torch.triu_indices(T, T, offset=1, device=gram.device)
    squared = cos[iu[0], iu[1]].square()
    total = squared.sum() if reduction == "sum" else squared.mean()
    return weight * total


class OrthogonalGradients(MTLRegularizer):
    """Adds ``λ · Σ_{i<j} cos²(gᵢ, gⱼ)`` to the objective, ``gᵢ = ∇_θ Lᵢ`` the task gradients on the shared
    parameters ``θ``: the tasks learn near-orthogonal gradients on the shared encoder.

    Suteu & Guo, "Regularizing Deep Multi-Task Networks using Orthogonal Gradients", arXiv:1912.06844 (2019;
    submitted to ICLR 2020). Their observation: well-performing multi-task models have task gradients whose
    angles vary little, and pushing the gradients on the shared parameters towards orthogonality reduces the
    interference between tasks (each decoder optimises a different part of the feature extractor).

    A *regulariser*, not a strategy (:mod:`lightning_mtl.regularizers`): attach it next to any one strategy,
    ``Trainer(callbacks=[PCGrad(), OrthogonalGradients(weight=0.1)])``. The term is back-propagated in the
    strategy's own single backward (through ``ctx.backward``), added to the strategy's objective as it is (the
    strategy's weights do not multiply it), once per micro-batch and divided by ``accumulate_grad_batches`` like
    the losses. Logged: ``train/orthogonal/penalty``, the window's mean term (mean over ranks).

    Conventions (what was and was not verified):

    * The penalty is the issue's definition, ``λ Σ_{i<j} cos²``: the **squared** cosine (orthogonality is
      ``cos = 0``, and the square is smooth there, unlike ``|cos|``), summed over the unordered pairs, on the
      gradient of **all** shared parameters flattened into one vector (not per layer). The paper's equation
      numbers, whether it penalises per layer or the whole encoder, and its value of ``λ`` were **not verified**
      (its method section was not available to us); one public re-implementation
      (``CosRegOptimizer``, default penalty 10) uses the *mean* of ``cos²`` over the ordered pairs ``i ≠ j``,
      which is ``reduction="mean"`` here. ``weight=1.0`` is our default, not the paper's.
    * A zero gradient (``‖gᵢ‖ < eps``, e.g. a task that does not reach the shared parameters on this step) has
      cosine 0 with every other one: the norms are clamped below at ``eps`` (:func:`gradient_cosines`).
    * Partial labels: only the tasks labelled on some rank this step (``ctx.present``) enter the pairs; a task
      labelled on another rank only has a zero local gradient here (cosine 0).
    * **Per rank under DDP.** The cosines are nonlinear in the gradients, so each rank penalises the cosines of
      its *local* gradients (of its own micro-batch) and DDP averages the resulting gradients: the update is the
      mean of the ranks' penalised updates, not the penalty of the global batch's gradients. 2 ranks × B is
      therefore not 1 process × 2B for this term (the task losses' part of the update still is). Making it
      global would need the ``[T, P]`` gradients all-reduced with their graph, which autograd cannot do.
    * AMP: under ``precision="16-mixed"`` each loss is multiplied by the GradScaler's scale before its gradient
      and the gradients divided by it (as :func:`lightning_mtl.gradients.grad_scale` users do); the cosines are
      scale-free anyway. An overflow makes the term non-finite, so the GradScaler skips the step.

    Cost: a double backward. Per micro-batch, ``T`` backward passes over the graph of the losses that *keep*
    their graph (``create_graph=True``), then the step's single backward also differentiates through those ``T``
    gradient graphs: roughly ``2T + 1`` backward-equivalents instead of 1 (about twice a step's backward per
    task), and the memory of ``T`` extra gradient graphs until the backward — with a gradient strategy and
    ``accumulate_grad_batches = k``, until the end of the window, so ``k`` of them.

    Args:
        weight: ``λ ≥ 0``, the weight of the penalty (default 1.0).
        reduction: ``"sum"`` over the pairs ``i < j`` (default, the issue's definition) or ``"mean"`` over them
            (the penalty then does not grow with the number of pairs).
        eps: the floor of the gradient norms in the cosines (default ``1e-8``).
    """

    log_key = "train/orthogonal/penalty"

    def __init__(self, weight: float = 1.0, reduction: Reduction = "sum", eps: float = 1e-8) -> None:
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(
                f"OrthogonalGradients(weight={weight!r}): the weight λ must be a finite number ≥ 0, e.g. weight=0.1."
            )
        if weight < 0:
            raise ValueError(
                f"OrthogonalGradients(weight={weight!r}): a negative weight would reward aligned (or opposed) "
                "gradients; use a weight ≥ 0 (0 disables the penalty)."
            )
        if reduction not in ("sum", "mean"):
            raise ValueError(
                f"OrthogonalGradients(reduction={reduction!r}): use 'sum' (over the pairs i < j) or 'mean'."
            )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"OrthogonalGradients(eps={eps!r}): eps must be a finite number > 0, e.g. 1e-8.")
        self.weight = float(weight)
        self.reduction: Reduction = reduction
        self.eps = float(eps)
        self._params: list[torch.nn.Parameter] | None = None
        #: the cosine matrix ``[T, T]`` (detached, this rank's) of the last micro-batch, ``None`` before
        self.last_cosines: Tensor | None = None

    @property
    @override
    def state_key(self) -> str:
        """Distinct for differently configured instances (several may be attached; none has state)."""
        return self._generate_state_key(weight=self.weight, reduction=self.reduction, eps=self.eps)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._params = None  # found on the first step (a module may find its shared parameters then)

    def parameters(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The shared parameters whose task gradients are made orthogonal (``module.shared_parameters()``)."""
        if self._params is None:
            self._params = shared_parameters_of(module, "OrthogonalGradients")
        check_trainable(module, self._params, "OrthogonalGradients", "the shared parameter")
        return self._params

    @override
    def term(self, ctx: StepContext) -> Tensor | None:
        if self.weight == 0.0:
            return None
        present = ctx.present_indices
        if len(present) < 2:
            return None
        losses = ctx.losses if len(present) == len(ctx.losses) else ctx.losses[present]
        gram = task_gramian(losses, self.parameters(ctx.module), grad_scale(ctx.trainer))
        self.last_cosines = gradient_cosines(gram.detach(), self.eps)
        return orthogonality_penalty(gram, self.weight, self.reduction, self.eps)
