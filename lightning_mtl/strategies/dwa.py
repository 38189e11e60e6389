"""Dynamic Weight Average (Liu, Johns & Davison 2019)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_mtl.functional.loss_weighting import dwa_weights
from lightning_mtl.strategies._loss_based import LossWeighting, present_mask
from lightning_mtl.task_state import take_tasks


class DWA(LossWeighting):
    """Dynamic Weight Average: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019 (https://arxiv.org/abs/1803.10704), eq. 7.

    ``wₖ(t) = T·exp(rₖ(t−1)/τ) / Σᵢ exp(rᵢ(t−1)/τ)`` with ``rₖ(t−1) = L̄ₖ(t−1)/L̄ₖ(t−2)``, where ``L̄ₖ(e)`` is
    task k's training loss averaged over the iterations of epoch ``e``; ``wₖ = 1`` during the first two
    epochs. Weights sum to ``T`` and are constant within an epoch. Under DDP the averages are over
    rank-averaged losses (identical on every rank). The running sums and the two previous averages are
    saved in checkpoints, by task name.

    Partial labels: ``L̄ₖ(e)`` averages task k's losses over the steps of epoch ``e`` where it was labelled
    (per-task counts); an epoch in which it was never labelled leaves its two averages as they were, so its
    ratio ``rₖ`` compares the last two epochs that labelled it (``rₖ = 1`` while it has fewer than two; with
    every task labelled this is the paper's rule, ``wₖ = 1`` for the first two epochs). A step with absent tasks
    applies eq. 7 to the present tasks only, i.e. the softmax over the ``P`` present tasks times ``P``: the
    present weights are the epoch's weights renormalised to sum ``P`` (each stays near 1, as equal weighting's
    on the present tasks), the absent ones are 0, and an absent task's running sum and count do not move.

    Args:
        temperature: τ, the softmax temperature (paper: 2). Larger τ gives more uniform weights.
    """

    #: partial labels: per-task epoch means over labelled steps, eq. 7 over the present tasks
    supports_absent_tasks = True

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
        #: partial labels: per-task counts of labelled steps this epoch (``None``: every step labelled every task,
        #: each count is ``_count``)
        self._counts: Tensor | None = None
        self._history: list[Tensor] = []  # [L̄(t-2), L̄(t-1)], oldest first; NaN: no average yet for that task
        self._epoch_weights: Tensor | None = None

    def _close_epoch(self) -> None:
        if self._count > 0 and self._sum is not None:
            if self._counts is None:
                self._history = (self._history + [(self._sum / self._count).float().cpu()])[-2:]
            else:  # partial labels: only the tasks labelled this epoch shift their two averages
                counts = self._counts.to(self._sum.device)
                labelled = (counts > 0).cpu()
                mean = (self._sum / counts.clamp_min(1)).float().cpu()
                nan = torch.full_like(mean, float("nan"))
                older, last = ([nan, nan] + self._history)[-2:]
                self._history = [torch.where(labelled, last, older), torch.where(labelled, mean, last)]
                if bool(torch.isnan(self._history[0]).all()):
                    self._history = self._history[1:]  # the layout of a run without partial labels
        self._sum, self._count, self._counts = None, 0, None
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
        if self._counts is not None:
            self._counts = self._counts + 1
        return self._current_weights().to(losses.device)

    def _current_weights(self) -> Tensor:
        if self._epoch_weights is None:
            if len(self._history) < 2:
                w = torch.ones(self.num_tasks)
            else:
                last, older = self._history[1], self._history[0]
                known = ~(torch.isnan(last) | torch.isnan(older))
                if bool(known.all()):
                    w = dwa_weights(last, older, self.temperature)
                elif not bool(known.any()):
                    w = torch.ones(self.num_tasks)
                else:  # partial labels: rₖ = 1 for a task without two averages yet
                    ones = torch.ones_like(last)
                    w = dwa_weights(
                        torch.where(known, last, ones), torch.where(known, older, ones), self.temperature
                    )
            self._epoch_weights = w
        return self._epoch_weights

    def compute_present_weights(self, losses: Tensor, present: list[bool]) -> Tensor:
        """Partial labels: the running sums and counts of the present tasks only; eq. 7 over the present tasks
        (the epoch's weights renormalised to sum ``P``), 0 for the absent ones."""
        detached = losses.detach().double()
        mask = present_mask(present, detached)
        if self._counts is None:
            self._counts = torch.full((self.num_tasks,), float(self._count), dtype=torch.float64)
        self._counts = self._counts.to(detached.device) + mask.double()
        masked = torch.where(mask, detached, torch.zeros_like(detached))
        self._sum = masked if self._sum is None else self._sum.to(detached.device) + masked
        self._count += 1
        w = self._current_weights().to(detached.device).double()
        w = torch.where(mask, w, torch.zeros_like(w))
        total = w.sum()
        if bool(total > 0):
            w = w * (float(sum(present)) / total)
        return w.to(losses.dtype)

    def reset_state(self) -> None:
        super().reset_state()
        self._sum, self._count, self._history, self._epoch_weights = None, 0, [], None
        self._counts = None

    def weights_tensor(self) -> Tensor | None:
        if self._present is not None:  # partial labels: the last step's weights over its present tasks
            return self._weights
        return self._epoch_weights if self._epoch_weights is not None else self._weights

    # The temperature is not part of the state's configuration: the state holds loss averages, which mean the
    # same under any τ; a resumed run may change τ as it may change the learning rate.
    def task_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "sum": None if self._sum is None else self._sum.cpu(),
            "count": self._count,
            "history": [h.cpu() for h in self._history],
        }
        if self._counts is not None:  # partial labels only: the per-task counts
            state["counts"] = self._counts.cpu()
        return state

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        total = state["sum"]
        total = None if total is None else take_tasks(total, order)
        history = [take_tasks(h, order) for h in state["history"]]
        self._sum, self._count, self._history = total, int(state["count"]), history
        counts = state.get("counts")
        self._counts = None if counts is None else take_tasks(counts, order).double()
        self._epoch_weights = None
