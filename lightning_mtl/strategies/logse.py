"""Log-loss strategies: LogSE (Ghasemi-Naraghi et al., JUCS 2022) and the scale-invariant ``Σ log Lᵢ``."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_mtl.functional.log_losses import (
    logse_loss,
    logse_weights,
    scale_invariant_loss,
    scale_invariant_weights,
)
from lightning_mtl.strategies._loss_based import LossWeighting, present_index, present_mask


class _LogLossWeighting(LossWeighting):
    """``scale·Σᵢ log(Lᵢ + ε)`` as a loss weighting: effective weights ``scale/(Lᵢ + ε)``, no state.

    Every ``Lᵢ + ε`` must be > 0. The check costs no host synchronisation beyond equal weighting's: on the
    CPU it is immediate (reading a CPU tensor does not synchronise anything); on a CUDA device the step's
    rank-averaged losses are copied to pinned host memory without blocking and read at the next step (the
    module's own per-step non-finite check has synchronised the stream by then), at the end of the epoch,
    of the fit and before a checkpoint is written. A step with a bad loss gives that task weight 0 (its
    update is left out) and the error follows one step later, naming the task, the value, the batch and
    the fix. Every DDP rank sees the same averaged losses, so all ranks raise alike.

    Partial labels: the objective is a sum of per-task terms, so a step with absent tasks sums the present
    tasks' terms only (no renormalisation): weight 0 for an absent task, whose (zero) loss is neither checked
    nor logged in the objective. No state.
    """

    #: partial labels: the present tasks' terms only
    supports_absent_tasks = True

    _name = "LogLoss"
    _loss_fn = staticmethod(scale_invariant_loss)
    _weights_fn = staticmethod(scale_invariant_weights)

    def __init__(self, eps: float) -> None:
        super().__init__()
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(
                f"{self._name} eps (the shift inside log(L + eps)) must be a finite number >= 0, got {eps!r}; "
                "use a small value such as 1e-8 to allow losses that reach 0."
            )
        self.eps = float(eps)
        self._where: tuple[int, int] | None = None  # (epoch, batch) of the current step, for the message
        self._defer: bool | None = None  # None: decided from the losses' device at the first step
        self._pending_host: Tensor | None = None  # pinned copy of the last unchecked losses (CUDA)
        self._pending_event: Any = None
        self._pending_where: tuple[int, int] | None = None

    def compute_weights(self, losses: Tensor) -> Tensor:
        defer = self._defer if self._defer is not None else losses.device.type == "cuda"
        if defer:
            self._check_pending()
            self._queue(losses)
            weights = self._weights_fn(losses, self.eps)
            # a non-positive Lᵢ + ε gives its task weight 0 for this step; the error follows at the next check
            return torch.where(losses > -self.eps, weights, torch.zeros_like(weights))
        # a CPU tensor (or, elsewhere, one synchronisation): a Python list is the cheapest check for T scalars
        self._raise_if_bad(losses.detach().tolist(), self._where)
        return self._weights_fn(losses, self.eps)

    def compute_present_weights(self, losses: Tensor, present: list[bool]) -> Tensor:
        """Partial labels: the present tasks' weights ``scale/(Lᵢ + ε)``, 0 for the absent ones (whose zero
        losses are replaced by 1 for the positivity check, so that they never raise)."""
        mask = present_mask(present, losses)
        weights = self.compute_weights(torch.where(mask, losses, torch.ones_like(losses)))
        return torch.where(mask, weights, torch.zeros_like(weights))

    def objective(self, losses: Tensor) -> Tensor:
        # logged as train/loss every step, unchecked: a bad loss raises in compute_weights (on CUDA one step
        # later, after a NaN/-inf train/loss)
        if self._present is not None:  # the present tasks' terms only
            index = present_index(self._present, losses)
            if index.numel() == 0:
                return losses.sum() * 0
            losses = losses.index_select(0, index)
        return self._loss_fn(losses, self.eps)

    # -------------------------------------------------------------------------------- the positivity check
    def _raise_if_bad(
        self, values: list[float], where: tuple[int, int] | None, deferred: bool = False
    ) -> None:
        eps = self.eps
        if all(v > -eps for v in values):  # False for NaN too
            return
        bad = {n: v for n, v in zip(self.task_names, values) if not v > -eps}
        at = "" if where is None else f" at training batch {where[1]} of epoch {where[0]}"
        late = (
            " (checked one step later on CUDA to avoid a host synchronisation; that step gave these tasks "
            "weight 0)"
            if deferred
            else ""
        )
        need = "strictly positive losses" if self.eps == 0 else f"losses > -eps = {-self.eps!r}"
        raise ValueError(
            f"{self._name} needs {need} (it back-propagates log(L + eps) with eps={self.eps!r}), got {bad}"
            f"{at}{late}. Use a loss that stays > 0 for these tasks (e.g. add a constant), raise eps, or use "
            "another strategy."
        )

    def _queue(self, losses: Tensor) -> None:
        host = self._pending_host
        if host is None or host.shape != losses.shape or host.dtype != losses.dtype:
            host = self._pending_host = torch.empty(
                losses.shape, dtype=losses.dtype, pin_memory=losses.device.type == "cuda"
            )
        host.copy_(losses.detach(), non_blocking=True)
        if losses.device.type == "cuda":
            self._pending_event = torch.cuda.Event()
            self._pending_event.record(torch.cuda.current_stream(losses.device))
        else:  # tests force the deferred path on the CPU, where the copy is synchronous
            self._pending_event = None
        self._pending_where = self._where or (-1, -1)

    def _check_pending(self) -> None:
        """Read the losses queued at the previous step (no-op when none is pending)."""
        if self._pending_where is None or self._pending_host is None:
            return
        if self._pending_event is not None:
            self._pending_event.synchronize()  # already complete: the module synchronised the stream since
        where = self._pending_where if self._pending_where != (-1, -1) else None
        self._pending_where, self._pending_event = None, None
        self._raise_if_bad(self._pending_host.tolist(), where, deferred=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._where = (int(trainer.current_epoch), int(batch_idx))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_pending()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_pending()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._check_pending()

    def reset_state(self) -> None:
        super().reset_state()
        self._where = self._pending_where = self._pending_event = None


class ScaleInvariant(_LogLossWeighting):
    """Scale-invariant loss ``Σᵢ log(Lᵢ + ε)``: the loss-scale balancing ("logarithm transformation" of every
    task loss) of DB-MTL, Lin et al., "Dual-Balancing for Multi-Task Learning" (first version: "A
    Scale-Invariant Task Balancing Approach for Multi-Task Learning"), arXiv:2308.12029 — here on its own,
    without DB-MTL's gradient balancing (:class:`DBMTL` has both); also STCH's warm-up objective
    (:class:`STCH`). The rule and ε are from LibMTL's ``DB_MTL`` code; the paper's equation numbers were not
    checked.

    The update is the gradient of ``Σ log(Lᵢ + ε)``, i.e. ``Σ wᵢ∇Lᵢ`` with the effective weights
    ``wᵢ = 1/(Lᵢ + ε)``, which :attr:`weights` reports (``Σ wᵢLᵢ = T`` for ε = 0: the step has equal
    weighting's total). Multiplying a task's loss by ``a > 0`` leaves the update unchanged for ε = 0 (and
    for ``Lᵢ ≫ ε``). It is IMTL-L (:class:`IMTLL`, ``Σ e^{sᵢ}Lᵢ − sᵢ``) with its scales at their optimum
    ``e^{sᵢ} = 1/Lᵢ`` for the current losses (DB-MTL's remark), and twice :class:`LogSE`, i.e. twice
    uncertainty weighting at its optimum (see :mod:`lightning_mtl.functional.log_losses`).

    Conventions: the **sum** of the log-losses, not the mean (the mean would divide the step by T); ε = 1e-8
    as LibMTL's ``DB_MTL`` (``torch.log(losses + 1e-8)``); STCH's warm-up uses ε = 0. No state, no
    hyper-parameter besides ε. The weights come from the rank-averaged losses, so under DDP the update is the
    gradient of the objective at the full-batch losses; under gradient accumulation, as the other
    loss-based strategies, each micro-batch is weighted by its own losses. The objective (logged as
    ``train/loss``) is negative when the losses are below 1. Cost: equal weighting's plus a few elementwise
    kernels on T numbers. Every ``Lᵢ + ε`` must be > 0: an error names the task, the value and the batch —
    on a CUDA device one step later, to avoid a host synchronisation: the losses are copied to pinned memory
    without blocking and read at the next step (the module's own non-finite check has synchronised by then),
    at the end of the epoch or fit, or before a checkpoint; that step gives the bad task weight 0.

    Args:
        eps: ε >= 0, the shift inside the log (default 1e-8, LibMTL's DB-MTL).
    """

    _name = "ScaleInvariant"

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__(eps)


class LogSE(_LogLossWeighting):
    """LogSE: Ghasemi-Naraghi, Nickabadi & Safabakhsh, "LogSE: An Uncertainty-Based Multi-Task Loss Function
    for Learning Two Regression Tasks", J. Universal Computer Science 28(2):141–159, 2022
    (doi:10.3897/jucs.70549; no arXiv version found).

    **What was and was not verified.** Only the paper's title, abstract and keywords could be read (the
    publisher's page and its JATS XML front matter); its full text, hence its equations and their numbers,
    could not. From those: the loss captures homoscedastic (task-dependent) uncertainty for regression tasks
    "without increasing the complexity of the network", i.e. without the learned variances of uncertainty
    weighting, and its name reads as the log of the squared error (our reading). This class implements the
    loss those facts point to, derived here, not read in the paper: uncertainty weighting's regression objective (Kendall,
    Gal & Cipolla, CVPR 2018, eq. 7: ``Σ Lᵢ/(2σᵢ²) + log σᵢ`` with ``Lᵢ`` the squared error) minimised over
    the variances in closed form, ``σᵢ² = Lᵢ``, which leaves

        LogSE = ½·Σᵢ log(Lᵢ + ε)   (+ the constant T/2, dropped),

    effective weights ``wᵢ = 1/(2(Lᵢ + ε))`` (reported by :attr:`weights`; ``Σ wᵢLᵢ = T/2`` for ε = 0).
    These are exactly :class:`UncertaintyWeighting`'s weights ``cᵢe^{−sᵢ}`` at their optimum
    ``sᵢ* = log(2cᵢLᵢ)`` for the current losses, for regression and classification tasks alike (the
    derivation is in :mod:`lightning_mtl.functional.log_losses`): LogSE is uncertainty weighting with the
    variances set to their maximum-likelihood value at every step instead of learned by gradient descent,
    and half of :class:`ScaleInvariant`. Unverified: whether the paper keeps the factor ½ (it only scales
    the step; under Adam it does not matter), whether it adds an ε (default here 0: none), whether it uses
    the sum or the mean of the squared errors (the log makes that a constant: same update), and its
    equation numbers. If the paper's loss differs from this derivation, this class is not the paper's
    method.

    Generalised from the paper's two tasks to ``T`` tasks (the sum over tasks). ``Lᵢ`` is whatever the task
    returns (the paper: a squared error); nothing restricts it to regression, but the derivation assumes a
    Gaussian likelihood. No state. The weights come from the rank-averaged losses (the update under DDP is
    the gradient at the full-batch losses); under accumulation each micro-batch is weighted by its own
    losses. The objective can be negative. Cost: equal weighting's plus a few elementwise kernels on T
    numbers. Every ``Lᵢ + ε`` must be > 0: an error names the task, the value and the batch (on a CUDA
    device one step later, without a host synchronisation, as :class:`ScaleInvariant`).

    Args:
        eps: ε >= 0 inside the log (default 0.0, as the derivation; use e.g. 1e-8 if a loss can reach 0).
    """

    _name = "LogSE"
    _loss_fn = staticmethod(logse_loss)
    _weights_fn = staticmethod(logse_weights)

    def __init__(self, eps: float = 0.0) -> None:
        super().__init__(eps)


__all__ = ["LogSE", "ScaleInvariant"]
