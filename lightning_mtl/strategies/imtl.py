"""IMTL: impartial multi-task learning (Liu et al. 2021) — the loss balance IMTL-L alone and the hybrid IMTL."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_mtl.functional.gradient_methods import imtl_g_weights
from lightning_mtl.functional.loss_weighting import imtl_l_objective
from lightning_mtl.step import StepContext
from lightning_mtl.strategies._gradient_based import GradientMode, GradientWeighting, JacobianMethod, SyncMode
from lightning_mtl.strategies._learnable import LearnableParameters, OptimizerChoice
from lightning_mtl.strategies._loss_based import LossWeighting, present_index, present_mask
from lightning_mtl.task_state import take_tasks

_GRADIENT_EPS = torch.finfo(torch.float32).eps


def _check_hyper_parameters(owner: str, init: float, bounds: tuple[float, float] | None) -> None:
    if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
        raise ValueError(f"{owner} init (the initial log-scale sᵢ) must be a finite number, got {init!r}.")
    if bounds is not None and not (
        isinstance(bounds, (tuple, list))
        and len(bounds) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
        and bounds[0] < bounds[1]
    ):
        raise ValueError(
            f"{owner} bounds must be (low, high) finite numbers with low < high, e.g. (-5, 5), or None, got "
            f"{bounds!r}."
        )


class _LogScales:
    """The learnable ``sᵢ`` of IMTL-L, stepped by a private optimizer on the closed-form gradient."""

    def __init__(self, T: int, init: float, optimizer: OptimizerChoice, lr: float | None) -> None:
        self.learnable = LearnableParameters(torch.full((T,), float(init)), optimizer, lr)

    @property
    def s(self) -> Tensor:
        return self.learnable.param.detach()

    def accumulate(self, ctx: StepContext) -> Tensor:
        """Prepare the optimizer, add this micro-batch's ``(e^{s}L − 1)/k`` (rank-averaged losses) to the
        gradient of ``s`` and return the scales ``e^{s}`` (float32, on the losses' device). Partial labels
        (``ctx.present``): only the present tasks' ``sᵢ`` take a gradient; a task absent from the whole window
        keeps its ``sᵢ`` and its optimizer state (see :meth:`LearnableParameters.step`)."""
        learn = self.learnable
        learn.prepare(ctx.trainer, ctx.losses.device)
        scale = learn.param.detach().exp()
        grad = scale * ctx.global_losses - 1
        k = ctx.accumulate_grad_batches
        learn.accumulate(grad if k == 1 else grad / k, ctx.present)
        return scale

    def step(self, module: pl.LightningModule, skipped: bool, bounds: tuple[float, float] | None) -> None:
        self.learnable.step(module.trainer, skipped)
        if bounds is not None:
            with torch.no_grad():
                self.learnable.param.clamp_(*bounds)

    def discard(self) -> None:
        self.learnable.discard()


class _LearnedLogScales:
    """What IMTLL and IMTL share: the learned ``sᵢ`` of IMTL-L (arguments, binding, stepping after each
    optimizer step, discarding, resetting) and the IMTL-L objective. Mixed in before the strategy base."""

    def _set_log_scale_arguments(
        self,
        owner: str,
        init: float,
        bounds: tuple[float, float] | None,
        optimizer: OptimizerChoice,
        lr: float | None,
    ) -> None:
        _check_hyper_parameters(owner, init, bounds)
        LearnableParameters(torch.zeros(1), optimizer, lr)  # validates optimizer / lr now
        self.init = float(init)
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))
        self.optimizer = optimizer
        self.lr = lr
        self._scales: _LogScales | None = None

    def bind(self, tasks) -> None:  # noqa: ANN001 - see MTLStrategy.bind
        super().bind(tasks)  # type: ignore[misc]
        T = len(self.task_names)  # type: ignore[attr-defined]
        if self._scales is None or self._scales.s.numel() != T:
            self._scales = _LogScales(T, self.init, self.optimizer, self.lr)

    @property
    def log_scales(self) -> Tensor:
        """The learned ``sᵢ`` (detached), in task order; the losses are scaled by ``e^{sᵢ}``."""
        assert self._scales is not None, f"{type(self).__name__} is not attached to a module yet"
        return self._scales.s

    def objective(self, losses: Tensor) -> Tensor:
        assert self._scales is not None
        return imtl_l_objective(losses, self._scales.s.to(losses))

    def on_optimizer_step(self, module: pl.LightningModule, skipped: bool) -> None:
        super().on_optimizer_step(module, skipped)  # type: ignore[misc]
        assert self._scales is not None
        self._scales.step(module, skipped, self.bounds)

    def on_accumulation_window_discarded(self, module: pl.LightningModule) -> None:
        super().on_accumulation_window_discarded(module)  # type: ignore[misc]
        if self._scales is not None:
            self._scales.discard()

    def reset_state(self) -> None:
        super().reset_state()  # type: ignore[misc]
        self._scales = None  # bind() builds fresh s at ``init`` with a fresh optimizer


class IMTLL(_LearnedLogScales, LossWeighting):
    """IMTL-L, the loss balance of IMTL alone: Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards
    Impartial Multi-task Learning", ICLR 2021 (https://openreview.net/forum?id=IMPnRXEWpvr), the loss balance.

    Learns one log-scale ``sᵢ`` per task (init 0: the plain sum at the start) and minimises the scaled losses
    ``Σᵢ e^{sᵢ}Lᵢ − sᵢ`` (eq. 6 with base ``e``, as the authors, LibMTL and TorchJD's ``IMTLL``). The task
    weights are ``e^{sᵢ}`` (no normalisation: they sum to ``T`` only at the start); ``∂/∂sᵢ = e^{sᵢ}Lᵢ − 1``
    vanishes at ``e^{sᵢ} = 1/Lᵢ``, so every scaled loss tends to 1 — the losses are kept at a comparable
    scale without any distribution assumption. (Up to a factor 2 and the sign of ``s``, this is the common
    ``e^{−s}L + s`` port of uncertainty weighting.) The objective can be negative; it assumes positive losses.

    Like :class:`UncertaintyWeighting`, the ``sᵢ`` are not in your model or optimizer: a private optimizer
    (``optimizer``/``lr``) steps them on the closed-form gradient at the rank-averaged losses, so the method is
    exact under DDP and unaffected by AMP loss scaling and weight decay (LibMTL puts ``s`` in the model's
    optimizer, with its weight decay). They are checkpointed with the optimizer's state, by task name.

    Partial labels: the objective is a sum of per-task terms, so a step with absent tasks keeps the present
    tasks' terms (no renormalisation). An absent task has weight 0, its term ``e^{sᵢ}Lᵢ − sᵢ`` is left out of
    the objective and ``train/loss``, and its ``sᵢ`` gets no gradient: when no micro-batch of the accumulation
    window labels it, its ``sᵢ`` and its entries of the private optimizer's state (Adam's moments) are left
    bit-for-bit untouched by the step (only the optimizer's shared step count counts it).

    Args:
        init: initial value of every ``sᵢ`` (default ``0.0``, the paper's).
        bounds: optional ``(low, high)`` clamp of ``s`` after each step: a loss that tends to 0 drives
            ``sᵢ = −log Lᵢ → ∞`` (its weight explodes); ``(-5, 5)`` is a reasonable guard. Default: none.
        optimizer: ``"match"`` (same optimizer class and settings as the model's first optimizer, weight
            decay 0; default), ``"adam"`` or ``"sgd"``.
        lr: learning rate of ``s``; ``None`` (default) follows the model's learning rate.
    """

    def __init__(
        self,
        init: float = 0.0,
        bounds: tuple[float, float] | None = None,
        optimizer: OptimizerChoice = "match",
        lr: float | None = None,
    ) -> None:
        super().__init__()
        self._set_log_scale_arguments("IMTLL", init, bounds, optimizer, lr)

    #: partial labels: absent tasks' terms left out, their sᵢ and optimizer state untouched
    supports_absent_tasks = True

    def backward(self, ctx: StepContext) -> None:
        assert self._scales is not None
        scale = self._scales.accumulate(ctx)
        self._present = ctx.present
        if ctx.present is not None:
            scale = torch.where(present_mask(ctx.present, scale), scale, torch.zeros_like(scale))
        ctx.backward((scale * ctx.losses).sum())
        self._weights = scale

    def objective(self, losses: Tensor) -> Tensor:
        if self._present is None:
            return super().objective(losses)
        assert self._scales is not None
        index = present_index(self._present, losses)
        return imtl_l_objective(losses[index], self._scales.s.to(losses)[index])

    def on_optimizer_step(self, module: pl.LightningModule, skipped: bool) -> None:
        super().on_optimizer_step(module, skipped)
        self._weights = None  # s moved: weights_tensor() recomputes on demand

    def weights_tensor(self) -> Tensor | None:
        if self._scales is None:
            return None
        weights = self._scales.s.exp()
        if self._present is not None:  # the tasks absent at the last step had weight 0
            weights = torch.where(present_mask(self._present, weights), weights, torch.zeros_like(weights))
        return weights

    def extra_metrics(self) -> dict[str, Tensor]:
        if self._scales is None:
            return {}
        s = self._scales.s
        return {f"train/imtl_l/s/{t}": s[i] for i, t in enumerate(self.task_names)}

    def state_config(self) -> dict[str, Any]:
        """``s`` always means the log-scale of ``e^{s}L − s``; ``init``, ``bounds``, ``optimizer`` and ``lr``
        only shape the trajectory."""
        return {}

    def task_state(self) -> dict[str, Any]:
        return {} if self._scales is None else {"learnable": self._scales.learnable.state_dict()}

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        if "learnable" in state:
            assert self._scales is not None, "bind() builds the parameters before a state is loaded"
            self._scales.learnable.load_state_dict(state["learnable"], order)


class IMTL(_LearnedLogScales, GradientWeighting):
    """IMTL, the hybrid of loss and gradient balance: Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang,
    "Towards Impartial Multi-task Learning", ICLR 2021 (https://openreview.net/forum?id=IMPnRXEWpvr), the
    hybrid balance.

    The losses are scaled as in IMTL-L (:class:`IMTLL`, eq. 6): ``e^{sᵢ}Lᵢ − sᵢ`` with learned ``sᵢ`` (init 0).
    On the shared part, IMTL-G (:class:`IMTLG`; the paper's closed form ``α₂:T = g₁Uᵀ(DUᵀ)⁻¹``) combines the gradients ``gᵢ' = e^{sᵢ}gᵢ`` of the
    *scaled* losses: ``α = imtl_g_weights(G')`` on their Gramian ``G' = D G D``, ``D = diag(e^{s})`` (no second
    Jacobian), so that the update ``Σ αᵢgᵢ'`` has equal projections on every unit gradient ``uᵢ = gᵢ'/‖gᵢ'‖``
    (``Σ αᵢ = 1``; ``α`` may be negative; pseudo-inverse for collinear gradients). Since ``uᵢ`` does not
    depend on the scale, ``α`` is that of IMTL-G on the raw gradients times ``e^{−s}`` (renormalised): the
    shared update is the IMTL-G direction, its length set by the scaled losses. The task-specific parameters
    take the scaled losses' gradients ``e^{sᵢ}∇Lᵢ`` and ``s`` its closed-form gradient ``e^{sᵢ}Lᵢ − 1``
    (rank-averaged losses of the window), stepped by a private optimizer as in :class:`IMTLL`.

    ``weights`` (and ``train/weight/<task>``) are the coefficients of the unscaled gradients in the shared
    update, ``wᵢ = αᵢe^{sᵢ}``; ``train/imtl/alpha/<task>`` and ``train/imtl/s/<task>`` log ``α`` and ``s``;
    ``train/loss`` is ``Σ e^{sᵢ}Lᵢ − sᵢ``. The paper computes IMTL-G on the gradients w.r.t. the shared
    representation: ``mode="representation"`` (mark ``z = self.shared_representation(z)``) follows it and is
    cheaper; ``mode="parameters"`` (default) uses the shared parameters. Under ``update_every=k`` the steps in
    between reuse ``w`` of the last update for the shared part; the heads and ``s`` always use the current
    ``s``. Exact under DDP with ``sync="exact"``; with ``sync="local"`` ``s`` still sees rank-averaged losses.
    (LibMTL keeps ``s`` in the model's optimizer, so weight decay applies to it; not here.)

    Partial labels: in a step where some tasks are labelled on no rank, IMTL-G runs on the present tasks only
    (their block of ``G'``, their scales ``e^{sᵢ}``): ``α`` sums to 1 over them and the absent tasks' ``α`` and
    weight are 0 (their entries of the saved ``α`` keep their last value). The absent tasks' ``sᵢ`` and their
    private optimizer state are left untouched as in :class:`IMTLL` (the learned scales are shared with it).

    Args:
        init: initial value of every ``sᵢ`` (default ``0.0``, the paper's).
        bounds: optional ``(low, high)`` clamp of ``s`` after each step (see :class:`IMTLL`). Default: none.
        optimizer: private optimizer of ``s``: ``"match"`` (default), ``"adam"`` or ``"sgd"``.
        lr: learning rate of ``s``; ``None`` (default) follows the model's learning rate.
        mode: ``"parameters"`` (default) or ``"representation"`` (the paper).
        update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    #: partial labels: IMTL-G on the present tasks (``α`` narrowed, :meth:`method_task_dims`); ``s`` as IMTLL
    supports_absent_tasks = True

    heads = "plain"  # overridden by head_weights(): the heads get e^{sᵢ}∇Lᵢ

    def __init__(
        self,
        init: float = 0.0,
        bounds: tuple[float, float] | None = None,
        optimizer: OptimizerChoice = "match",
        lr: float | None = None,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        self._set_log_scale_arguments(
            "IMTL", init, bounds, optimizer, lr
        )  # checked before the base's arguments
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian)
        self._scale: Tensor | None = None  # e^{s} of the current micro-batch
        self._alpha: Tensor | None = None

    @property
    def alpha(self) -> Tensor | None:
        """IMTL-G's ``α`` (sums to 1) of the last update, on the scaled losses' gradients."""
        return self._alpha

    # ------------------------------------------------------------------ the step
    def backward(self, ctx: StepContext) -> None:
        assert self._scales is not None
        self._scale = self._scales.accumulate(ctx)  # s is constant within a window: stepped after it
        super().backward(ctx)

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        assert self._scale is not None
        d = self._scale.to(stat)
        if self.present_index is not None:  # partial labels: the present tasks' scales
            d = d[torch.tensor(self.present_index, dtype=torch.long, device=d.device)]
        alpha = imtl_g_weights(d[:, None] * stat * d[None, :], eps=_GRADIENT_EPS)  # G' = D G D
        self._alpha = alpha.float()
        return alpha * d

    def head_weights(self) -> Tensor | None:
        return self._scale

    def reset_state(self) -> None:
        super().reset_state()
        self._scale = None

    # ------------------------------------------------------------------ what gets logged / saved
    def extra_metrics(self) -> dict[str, Tensor]:
        metrics = super().extra_metrics()
        if self._scales is not None:
            s = self._scales.s
            metrics.update({f"train/imtl/s/{t}": s[i] for i, t in enumerate(self.task_names)})
        if self._alpha is not None:
            metrics.update({f"train/imtl/alpha/{t}": self._alpha[i] for i, t in enumerate(self.task_names)})
        return metrics

    def method_state(self) -> dict[str, Any]:
        return {"alpha": None if self._alpha is None else self._alpha.detach().cpu().clone()}

    def load_method_state(self, state: Mapping[str, Any], order: Sequence[int] | None = None) -> None:
        alpha = state.get("alpha")
        if alpha is not None and order is not None:
            alpha = take_tasks(alpha, order)
        self._alpha = None if alpha is None else alpha.clone()

    def method_task_dims(self) -> dict[str, tuple[int, ...]]:
        """``α`` is per task: a step on the present tasks replaces their entries only."""
        return {"alpha": (0,)}

    def method_absent_fill(self) -> dict[str, float]:
        """A task absent from the first update has ``α = 0`` until it is present."""
        return {"alpha": 0.0}

    def task_state(self) -> dict[str, Any]:
        state = super().task_state()
        if self._scales is not None:
            state["learnable"] = self._scales.learnable.state_dict()
        return state

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        super().load_task_state(state, order)
        if "learnable" in state:
            assert self._scales is not None, "bind() builds the parameters before a state is loaded"
            self._scales.learnable.load_state_dict(state["learnable"], order)
