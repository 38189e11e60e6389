"""Dynamic Weight Average (Liu, Johns & Davison 2019)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_mtl.functional.loss_weighting import dwa_weights
from lightning_mtl.strategies._loss_based import LossWeighting
from lightning_mtl.task_state import take_tasks


class DWA(LossWeighting):
    """Dynamic Weight Average: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019 (https://arxiv.org/abs/1803.10704), eq. 7.

    ``wₖ(t) = T·exp(rₖ(t−1)/τ) / Σᵢ exp(rᵢ(t−1)/τ)`` with ``rₖ(t−1) = L̄ₖ(t−1)/L̄ₖ(t−2)``, where ``L̄ₖ(e)`` is
    task k's training loss averaged over the iterations of epoch ``e``; ``wₖ = 1`` during the first two
    epochs. Weights sum to ``T`` and are constant within an epoch. Under DDP the averages are over
    rank-averaged losses (identical on every rank). The running sums and the two previous averages are
    saved in checkpoints, by task name.

    Args:
        temperature: τ, the softmax temperature (paper: 2). Larger τ gives more uniform weights.
    """

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or not temperature > 0
        ):
            raise ValueError(f"DWA temperature must be > 0 and finite (paper: 2), got {temperature!r}.")
        self.temperature = float(temperature)
        self._sum: Tensor | None = None
        self._count = 0
        self._history: list[Tensor] = []  # [L̄(t-2), L̄(t-1)], oldest first
        self._epoch_weights: Tensor | None = None

    def _close_epoch(self) -> None:
        if self._count > 0 and self._sum is not None:
            self._history = (self._history + [(self._sum / self._count).float().cpu()])[-2:]
        self._sum, self._count = None, 0
        self._epoch_weights = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # An epoch ends when the next pass over the data starts. Keying on the batch index rather than on
        # trainer.current_epoch keeps a mid-epoch resume exact (Lightning relabels the resumed epoch).
        if batch_idx == 0:
            self._close_epoch()

    def compute_weights(self, losses: Tensor) -> Tensor:
        detached = losses.detach().double()
        self._sum = detached if self._sum is None else self._sum + detached
        self._count += 1
        if self._epoch_weights is None:
            if len(self._history) < 2:
                w = torch.ones(self.num_tasks)
            else:
                w = dwa_weights(self._history[1], self._history[0], self.temperature)
            self._epoch_weights = w
        return self._epoch_weights.to(losses.device)

    def reset_state(self) -> None:
        super().reset_state()
        self._sum, self._count, self._history, self._epoch_weights = None, 0, [], None

    def weights_tensor(self) -> Tensor | None:
        return self._epoch_weights if self._epoch_weights is not None else self._weights

    # The temperature is not part of the state's configuration: the state holds loss averages, which mean the
    # same under any τ; a resumed run may change τ as it may change the learning rate.
    def task_state(self) -> dict[str, Any]:
        return {
            "sum": None if self._sum is None else self._sum.cpu(),
            "count": self._count,
            "history": [h.cpu() for h in self._history],
        }

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        total = state["sum"]
        total = None if total is None else take_tasks(total, order)
        history = [take_tasks(h, order) for h in state["history"]]
        self._sum, self._count, self._history = total, int(state["count"]), history
        self._epoch_weights = None
