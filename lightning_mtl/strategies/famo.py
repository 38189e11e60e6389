"""FAMO: Fast Adaptive Multitask Optimization (Liu, Feng, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_mtl.functional.famo import famo_effective_weights, famo_logits_grad, famo_objective
from lightning_mtl.strategies._learnable import LearnableParameters
from lightning_mtl.strategies._loss_based import LossWeighting, on_present, present_index

if TYPE_CHECKING:
    from lightning_mtl.task import Task


class FAMO(LossWeighting):
    """FAMO: Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
    (https://arxiv.org/abs/2306.03792; its equation numbers were not checked here), and the authors' code
    https://github.com/Cranial-XIX/FAMO.

    Logits ``ξ`` (init 0), task weights ``z = softmax(ξ)`` and ``Dᵢ = Lᵢ − ℓᵢ* + 1e-8`` (``ℓ*`` the lower
    bounds ``min_losses``, default 0). Each step back-propagates ``Σᵢ zᵢ log Dᵢ / c`` with ``c = Σⱼ zⱼ/Dⱼ``
    held constant: one backward, the model's update is ``Σ wᵢ∇Lᵢ`` with the effective weights
    ``wᵢ = zᵢ/(c·Dᵢ)`` (they sum to 1), which :attr:`weights` reports; :meth:`objective` is
    ``Σ zᵢ log Dᵢ / c``. After the optimizer step the module recomputes the losses of the same batch
    without gradient (the hook ``needs_post_step_losses``, see :class:`~lightning_mtl.MultiTaskModule`), and
    ``ξ`` takes one step of a private Adam (lr ``β``, L2 weight decay ``γ``, as the authors' code) on
    ``δ = J_softmax(ξ)ᵀ (log D(θₜ) − log D(θₜ₊₁))``: ``ξ ← ξ − β·Adam(δ + γξ)``, so a task whose loss fell
    less than the others' gains weight.

    Defaults: ``β = 0.025`` (the paper's and the authors' code), ``γ = 1e-3`` (TorchJD's default, which it
    attributes to the paper's Algorithm 2 and to LibMTL; the standalone ``famo.py`` of the authors' repository
    defaults to ``γ = 0.01``), ``ℓ* = 0``. The authors also clip the shared gradient norm to 1: set
    ``gradient_clip_val=1.0`` on the module for that.

    Conventions: the weights and ``δ`` come from the rank-averaged losses, so under DDP the update equals the
    single-process one on the union of the ranks' batches. Under gradient accumulation each micro-batch's
    weights come from its own losses with the current ``ξ``, and ``ξ`` is updated once per optimizer step, from
    the losses of the window's **last** micro-batch before and after the step. A step the AMP scaler skipped,
    or a window discarded for non-finite values, leaves ``ξ`` unchanged. Every loss (before and after the
    step) must exceed its lower bound: otherwise an error names the task and the value. ``ξ`` and its Adam
    state are saved in checkpoints by task name, with the lower bounds (resuming under others is an error).

    Partial labels: a step with absent tasks applies FAMO to the ``P`` present tasks: ``z = softmax(ξ)`` over
    their logits, ``c`` and the effective weights over them (they sum to 1), 0 for the absent tasks, whose
    losses are not checked. The post-step update of ``ξ`` uses the tasks present in the window's last
    micro-batch (the one whose losses are recomputed): ``δ`` is the softmax Jacobian of the present logits times
    their log-loss decreases, and the weight decay applies to them only; an absent task's logit and its Adam
    moments are left bit-for-bit untouched (only Adam's shared step count counts the step).

    Args:
        lr: ``β`` > 0, the logits' learning rate (paper: 0.025).
        weight_decay: ``γ`` >= 0, the logits' weight decay (default 1e-3).
        min_losses: ``{task: ℓᵢ*}`` lower bounds of the losses (tasks left out: 0); ``None``: all 0.
    """

    needs_post_step_losses = True

    #: partial labels: FAMO over the present tasks; absent tasks' logits and Adam moments untouched
    supports_absent_tasks = True

    def __init__(
        self, lr: float = 0.025, weight_decay: float = 1e-3, min_losses: Mapping[str, float] | None = None
    ) -> None:
        super().__init__()
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or not lr > 0:
            raise ValueError(f"FAMO lr must be > 0 and finite (the paper's 0.025), got {lr!r}.")
        if (
            isinstance(weight_decay, bool)
            or not isinstance(weight_decay, (int, float))
            or not math.isfinite(weight_decay)
            or weight_decay < 0
        ):
            raise ValueError(
                f"FAMO weight_decay must be >= 0 and finite (default 1e-3), got {weight_decay!r}."
            )
        if min_losses is not None:
            if not isinstance(min_losses, Mapping):
                raise TypeError(
                    f"FAMO min_losses must be a {{task: value}} dict or None, got {min_losses!r}."
                )
            for task, v in min_losses.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"FAMO min_losses for task {task!r} must be a finite number, got {v!r}.")
            min_losses = {str(k): float(v) for k, v in min_losses.items()}
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.min_losses = min_losses
        self._min: Tensor | None = None
        self._learnable: LearnableParameters | None = None

    def bind(self, tasks: Sequence[Task]) -> None:
        super().bind(tasks)
        names = self.task_names
        if self.min_losses is not None:
            unknown = sorted(set(self.min_losses) - set(names))
            if unknown:
                raise ValueError(f"FAMO min_losses names unknown task(s) {unknown}; tasks are {list(names)}.")
        bounds = self.min_losses or {}
        self._min = torch.tensor([bounds.get(n, 0.0) for n in names], dtype=torch.float64)
        if self._learnable is None or self._learnable.param.numel() != len(names):
            self._learnable = LearnableParameters(torch.zeros(len(names)), "adam", self.lr)

    @property
    def logits(self) -> Tensor:
        """The logits ``ξ`` in task order (``softmax(ξ)`` are the weights ``z``)."""
        assert self._learnable is not None, "FAMO is not attached to a module yet"
        return self._learnable.param

    def _check(self, losses: Tensor, when: str, index: Tensor | None = None) -> None:
        """Every loss (of the present tasks ``index``; ``None``: all) finite and above its lower bound."""
        assert self._min is not None
        low = self._min.to(losses.device)
        names = list(self.task_names)
        if index is not None:
            losses, low, names = losses[index], low[index], [names[i] for i in index.tolist()]
        if not bool(((losses > low) & torch.isfinite(losses)).all()):  # one host synchronisation
            bad = {
                n: float(v)
                for n, v, m in zip(names, losses.tolist(), low.tolist())
                if not (math.isfinite(v) and v > m)
            }
            raise ValueError(
                f"FAMO needs every loss {when} to be finite and above its lower bound min_losses (default 0; it "
                f"uses log(Lᵢ − ℓᵢ*)), got {bad}. Lower min_losses for these tasks or use a positive loss."
            )

    def compute_weights(self, losses: Tensor) -> Tensor:
        return self.compute_present_weights(losses, None)

    def compute_present_weights(self, losses: Tensor, present: list[bool] | None) -> Tensor:
        """Partial labels: FAMO's weights over the present tasks (softmax of their logits), 0 for the others."""
        assert self._learnable is not None and self._min is not None
        detached = losses.detach().double()
        xi = self._learnable.param.detach().to(detached.device)
        low = self._min.to(detached.device)
        if present is None:
            self._check(detached, "of the step")
            return famo_effective_weights(xi, detached, low).to(losses.dtype)
        index = present_index(present, detached)
        self._check(detached, "of the step", index)
        w = on_present(lambda x: famo_effective_weights(xi[index], x, low[index]), detached, present)
        return w.to(losses.dtype)

    def on_post_step_losses(
        self, module: pl.LightningModule, losses_before: Tensor, losses_after: Tensor
    ) -> None:
        assert self._learnable is not None and self._min is not None
        learn = self._learnable
        learn.prepare(module.trainer, losses_before.device)
        after = losses_after.detach().double()
        before = losses_before.detach().double()
        present = self._present  # of the window's last micro-batch, whose losses these are
        index = None if present is None else present_index(present, after)
        self._check(after, "after the optimizer step", index)
        low = self._min.to(after.device)
        xi = learn.param.detach()
        if index is None:
            delta = famo_logits_grad(xi.double(), before, after, low)
            # Adam's L2 weight decay, as torch.optim.Adam adds it
            grad = delta.to(xi.dtype) + self.weight_decay * xi
        else:  # the present tasks' logits only: softmax over them, their weight decay
            ix = index.to(xi.device)
            delta = famo_logits_grad(xi[ix].double(), before[index], after[index], low[index])
            sub = delta.to(xi.dtype) + self.weight_decay * xi[ix]
            grad = torch.zeros_like(xi).index_copy_(0, ix, sub)
        learn.accumulate(grad, present)
        learn.step(module.trainer)

    def objective(self, losses: Tensor) -> Tensor:
        assert self._learnable is not None and self._min is not None
        x = losses.detach().double()
        low = self._min.to(x.device)
        x = torch.maximum(x, low + 1e-300)  # a value to log even below the bound (the step raises)
        xi = self._learnable.param.detach().to(x.device)
        if self._present is not None:
            index = present_index(self._present, x)
            if index.numel() == 0:
                return losses.sum() * 0
            xi, x, low = xi[index], x[index], low[index]
        return famo_objective(xi, x, low).to(losses.dtype)

    def extra_metrics(self) -> dict[str, Tensor]:
        if self._learnable is None:
            return {}
        z = torch.softmax(self._learnable.param.detach(), dim=-1)
        return {f"train/famo/z/{t}": z[i] for i, t in enumerate(self.task_names)}

    def reset_state(self) -> None:
        super().reset_state()
        self._learnable = None  # bind() builds fresh logits (0) with a fresh optimizer

    def state_config(self) -> dict[str, Any]:
        """The lower bounds ``ℓ*`` give the logits their meaning; ``lr`` and ``weight_decay`` only shape the
        trajectory."""
        return {"min_losses": dict(zip(self.task_names, self._min.tolist())) if self._min is not None else {}}

    def task_state(self) -> dict[str, Any]:
        return {} if self._learnable is None else {"learnable": self._learnable.state_dict()}

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        if "learnable" in state:
            assert self._learnable is not None, "bind() builds the logits before a state is loaded"
            self._learnable.load_state_dict(state["learnable"], order)
