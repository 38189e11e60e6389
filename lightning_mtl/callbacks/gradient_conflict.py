"""Gradient-conflict monitor: how much the task gradients on the shared parameters agree."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_mtl.callbacks._report import (
    SharedGradientProbe,
    check_every_n_steps,
    log_heatmap,
    log_scalars,
    matrix_table,
    print_rich,
)
from lightning_mtl.functional import cosine_similarities, gramian
from lightning_mtl.step import StepContext
from lightning_mtl.task_state import take_tasks, task_order


def conflict_statistics(J: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pairwise cosines ``[T, T]``, norms ``[T]`` and the fraction of conflicting pairs of the rows of ``J``.

    A pair ``i < j`` conflicts when ``cos(gᵢ, gⱼ) < 0`` (Yu et al., "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020). A zero gradient has cosine 0 with every other one (and 1 with itself). With one task the
    fraction is 0.
    """
    G = gramian(J)
    norms = G.diagonal().clamp_min(0).sqrt()
    cos = cosine_similarities(G)
    T = G.shape[0]
    iu = torch.triu_indices(T, T, offset=1)
    pairs = cos[iu[0], iu[1]]
    fraction = (pairs < 0).double().mean() if pairs.numel() else torch.zeros((), dtype=torch.float64)
    return cos.float(), norms.float(), fraction.float()


class GradientConflictMonitor(SharedGradientProbe):
    """Logs how the task gradients on the shared parameters agree, every ``every_n_steps`` optimizer steps.

    On a measured step, the task gradients ``gᵢ = ∇_θ Lᵢ`` w.r.t. ``shared_parameters()`` are computed from the
    step's own graph (one batched ``torch.autograd.grad`` before the strategy's backward: no second forward
    pass, no DDP all-reduce), averaged over ranks once (so they are the full-batch gradients), and logged:

    * ``grad/cos/<task_i>/<task_j>`` for ``i < j``: cosine similarity of ``gᵢ`` and ``gⱼ``;
    * ``grad/norm/<task>``: ``‖gᵢ‖``;
    * ``grad/conflict_fraction``: fraction of pairs with negative cosine (Yu et al. 2020, PCGrad's notion of
      conflict);
    * once per training epoch, the mean cosine matrix of the epoch's measurements as a heat-map image
      (``grad/cosine_heatmap``) in TensorBoard.

    Other steps cost one integer test. Works with any strategy (it only reads the losses). Under 16-bit AMP
    the gradients are computed on the scaled losses and unscaled. The running means since the start of
    training (:attr:`mean_cosine`, :attr:`mean_norms`, :attr:`mean_conflict_fraction`) are kept in the
    checkpoint.

    Args:
        every_n_steps: measure on every n-th optimizer step (default 50).
        log_heatmap: add the epoch's mean cosine matrix to TensorBoard as an image (default ``True``).
        print_summary: print the mean cosine matrix as a table at the end of fit (rank 0; default ``False``).
    """

    def __init__(
        self, every_n_steps: int = 50, log_heatmap: bool = True, print_summary: bool = False
    ) -> None:
        self.every_n_steps = check_every_n_steps("GradientConflictMonitor", every_n_steps)
        self.log_heatmap = bool(log_heatmap)
        self.print_summary = bool(print_summary)
        super().__init__()

    def reset(self) -> None:
        self._sum_cos: Tensor | None = None
        self._sum_norms: Tensor | None = None
        self._sum_fraction = 0.0
        self._count = 0
        self._epoch_cos: Tensor | None = None
        self._epoch_count = 0
        #: the last measurement: ``{"step", "cosine" [T, T], "norms" [T], "conflict_fraction"}``
        self.last: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    # ------------------------------------------------------------------ the measurement
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, ctx: StepContext
    ) -> None:
        cos, norms, fraction = conflict_statistics(self.shared_jacobian(trainer, ctx))
        self._record(trainer.global_step, cos, norms, fraction)
        names = self.task_names
        scalars = {"grad/conflict_fraction": float(fraction)}
        scalars.update({f"grad/norm/{n}": float(v) for n, v in zip(names, norms.tolist())})
        values = cos.tolist()
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                scalars[f"grad/cos/{names[i]}/{names[j]}"] = values[i][j]
        log_scalars(trainer, scalars)

    def _record(self, step: int, cos: Tensor, norms: Tensor, fraction: Tensor) -> None:
        cos, norms = cos.detach().cpu(), norms.detach().cpu()
        if self._sum_cos is None or self._sum_norms is None:
            self._sum_cos, self._sum_norms = torch.zeros_like(cos), torch.zeros_like(norms)
        self._sum_cos += cos
        self._sum_norms += norms
        self._sum_fraction += float(fraction)
        self._count += 1
        self._epoch_cos = cos.clone() if self._epoch_cos is None else self._epoch_cos + cos
        self._epoch_count += 1
        self.last = {"step": step, "cosine": cos, "norms": norms, "conflict_fraction": float(fraction)}

    # ------------------------------------------------------------------ reporting
    @property
    def mean_cosine(self) -> Tensor | None:
        """Mean pairwise-cosine matrix ``[T, T]`` over every measurement so far (``None`` before the first)."""
        return None if self._sum_cos is None else self._sum_cos / self._count

    @property
    def mean_norms(self) -> Tensor | None:
        return None if self._sum_norms is None else self._sum_norms / self._count

    @property
    def mean_conflict_fraction(self) -> float | None:
        return None if not self._count else self._sum_fraction / self._count

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_cos, self._epoch_count = None, 0

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_heatmap and self._epoch_cos is not None and self._epoch_count:
            log_heatmap(
                trainer,
                "grad/cosine_heatmap",
                self._epoch_cos / self._epoch_count,
                self.task_names,
                f"task-gradient cosine (epoch {trainer.current_epoch}, {self._epoch_count} measurements)",
                -1.0,
                1.0,
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mean = self.mean_cosine
        if self.print_summary and mean is not None and trainer.global_rank == 0:
            print_rich(
                matrix_table(
                    mean,
                    self.task_names,
                    f"mean task-gradient cosine ({self._count} measurements; "
                    f"conflicting pairs {100 * (self.mean_conflict_fraction or 0):.0f}%)",
                    "task",
                )
            )

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "task_names": list(self.task_names),
            "sum_cos": self._sum_cos,
            "sum_norms": self._sum_norms,
            "sum_fraction": self._sum_fraction,
            "count": self._count,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore by task name: the module's tasks may be in another order, not another set."""
        saved = tuple(state_dict["task_names"])
        sum_cos, sum_norms = state_dict["sum_cos"], state_dict["sum_norms"]
        if self.task_names:  # set up for fit: the running sums follow the module's task order
            order = task_order(type(self).__name__, saved, self.task_names)
            sum_cos = None if sum_cos is None else take_tasks(sum_cos, order, (0, 1))
            sum_norms = None if sum_norms is None else take_tasks(sum_norms, order)
        else:  # not set up for fit (e.g. validate(ckpt_path=...)): keep the saved order
            self.task_names = saved
        self._sum_cos, self._sum_norms = sum_cos, sum_norms
        self._sum_fraction = float(state_dict["sum_fraction"])
        self._count = int(state_dict["count"])
