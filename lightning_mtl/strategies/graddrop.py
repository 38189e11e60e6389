"""GradDrop: gradient sign dropout at the shared representation (Chen et al. 2020)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_mtl.functional.gradient_methods import graddrop
from lightning_mtl.gradients import JacobianMethod, TaskGradients, grad_scale
from lightning_mtl.step import StepContext
from lightning_mtl.strategies._gradient_based import _window_presence
from lightning_mtl.strategies._random import SeededGenerator
from lightning_mtl.strategies.base import MTLStrategy
from lightning_mtl.task import Task


class GradDrop(MTLStrategy):
    """GradDrop: Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing Deep
    Multitask Models with Gradient Sign Dropout", NeurIPS 2020 (https://arxiv.org/abs/2010.06808), Algorithm 1.

    At the shared representation ``A`` (mark it with ``z = self.shared_representation(z)`` in
    ``task_losses``) each task's gradient ``∇ᵢ = ∂Lᵢ/∂A`` is masked by sign purity: ``P = ½(1 + ΣSᵢ/Σ|Sᵢ|)``
    with ``Sᵢ = Σ_batch sign(A)⊙∇ᵢ``, a uniform draw ``U`` per element keeps the positive gradients where
    ``P > U`` and the negative ones elsewhere; the **sum** of the masked gradients is back-propagated into
    the encoder (:func:`~lightning_mtl.functional.graddrop.graddrop`). The heads get their usual gradients:
    the strategy back-propagates ``Σ Lᵢ`` plus a correction term on ``A``, in one pass through Lightning (DDP
    averaging and AMP scaling apply).

    GradDrop has no task weights (``weights`` is ``None``). Under DDP the purity is computed from each rank's
    batch (the masks are per device, as with a per-device batch in the paper's setting), with the same draw
    ``U`` on every rank; with gradient accumulation, per micro-batch. The draws come from a CPU generator
    seeded with ``seed`` (default: the global seed), saved in checkpoints.

    Partial labels: in a step (an accumulation window) where some tasks are labelled on no rank, the purity,
    the masks and the sum use the present tasks' rows only (an absent task has no loss: its row would be zero
    and change nothing, so this is the paper's rule on the present tasks, with the same draw ``U``). GradDrop
    has no per-task state; a task labelled on some ranks but not on this one has a zero row here, as any task
    whose loss does not reach the representation on this rank's batch.

    Args:
        leak: ``ℓ`` in ``[0, 1]``: a float for every task or a ``task -> value`` mapping (default 0; 1 lets a
            main task's gradient through unmasked).
        seed: generator seed (``None``: the global seed).
        jacobian: ``"auto"``, ``"batched"`` or ``"loop"`` (how the per-task representation gradients are taken).
    """

    #: partial labels: the present tasks' rows only (no per-task state)
    supports_absent_tasks = True

    def __init__(
        self,
        leak: float | Mapping[str, float] = 0.0,
        seed: int | None = None,
        *,
        jacobian: JacobianMethod = "auto",
    ) -> None:
        super().__init__()
        values = list(leak.values()) if isinstance(leak, Mapping) else [leak]
        for v in values:
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not (math.isfinite(v) and 0 <= v <= 1)
            ):
                raise ValueError(f"GradDrop leak values must be numbers in [0, 1], got {leak!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"GradDrop seed must be an int or None, got {seed!r}.")
        self.leak = leak
        self.seed = seed
        self._gradients = TaskGradients(
            "GradDrop",
            target="representation",
            sync="local",  # the purity is per rank (see above)
            jacobian=jacobian,
            representation_fix="GradDrop works on the representation only (it has no parameters mode)",
        )
        self._leak: Tensor | None = None
        self._random = SeededGenerator(seed)
        self._window_present: list[bool] | None = None  # which tasks the current window labels (None: all)

    def bind(self, tasks: Sequence[Task]) -> None:
        super().bind(tasks)
        if isinstance(self.leak, Mapping):
            unknown = sorted(set(self.leak) - set(self.task_names))
            if unknown:
                raise ValueError(
                    f"GradDrop leak names unknown task(s) {unknown}; tasks are {list(self.task_names)}."
                )
            self._leak = torch.tensor([float(self.leak.get(t, 0.0)) for t in self.task_names])
        else:
            self._leak = torch.full((len(self.task_names),), float(self.leak))

    @property
    def generator(self) -> torch.Generator:
        return self._random.get()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        _ = self.generator

    def backward(self, ctx: StepContext) -> None:
        assert self._leak is not None
        gradients = self._gradients
        if ctx.is_window_start:
            gradients.reset()
        gradients.add(ctx)
        # partial labels: a task is present in the window when one of its micro-batches labels it
        self._window_present = _window_presence(self._window_present, ctx.present, ctx.is_window_start)
        if not ctx.is_sync_step:
            return
        present, self._window_present = self._window_present, None
        rows = None
        if present is not None and not all(present):
            rows = torch.tensor([i for i, ok in enumerate(present) if ok], dtype=torch.long)
        combined = []
        for z, Z in gradients.representations:
            grads = Z.reshape(self.num_tasks, *z.shape)
            leak = self._leak
            if rows is not None:  # the present tasks' rows only
                grads, leak = grads[rows.to(grads.device)], leak[rows]
            if bool(torch.isfinite(grads).all()):
                leak = leak.to(grads)
                combined.append(graddrop(grads, z.detach(), leak=leak, generator=self.generator).reshape(-1))
            elif (
                grad_scale(ctx.trainer) is not None
            ):  # AMP overflow: a non-finite update makes the scaler skip
                combined.append(torch.full_like(Z[0], math.nan))
            else:
                raise FloatingPointError(
                    "GradDrop: the per-task gradients w.r.t. the shared representation are not finite although "
                    f"the losses are {gradients.losses.tolist()}. Lower the learning rate or clip the gradients."
                )
        # the representation receives the GradDrop gradient; the heads get ∇Σ Lᵢ
        gradients.backward_representation(ctx, combined)

    def on_accumulation_window_discarded(self, module: pl.LightningModule) -> None:
        self._gradients.reset()

    def reset_state(self) -> None:
        super().reset_state()
        self._random.reset()

    def task_state(self) -> dict[str, Any]:
        return self._random.state()

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        self._random.load(state)
