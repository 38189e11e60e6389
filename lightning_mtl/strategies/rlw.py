"""Random loss weighting (Lin et al. 2022)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from lightning_mtl.functional.loss_weighting import RandomDistribution, random_weights
from lightning_mtl.step import StepContext
from lightning_mtl.strategies._loss_based import LossWeighting, present_mask
from lightning_mtl.strategies._random import SeededGenerator
from lightning_mtl.task_state import take_tasks


class RLW(LossWeighting):
    """Random Loss Weighting: Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus
    Test for Multi-Task Learning", TMLR 2022 (https://arxiv.org/abs/2111.10603).

    A fresh weight vector is drawn for every optimizer step (constant over an accumulation window):
    ``w = softmax(z)``, ``z ~ N(0, I)`` by default. **The weights sum to 1** (equal weighting sums to ``T``):
    at the same learning rate RLW's step is about ``T`` times smaller than :class:`EqualWeighting`'s.
    Draws come from a CPU generator seeded with ``seed`` (default: Lightning's global seed from
    ``seed_everything``, else 0), identical on every rank and independent of the world size; its state
    is saved in checkpoints, so a resumed run draws the same weights (per task name, also when the module
    declares the tasks in another order).

    Partial labels: the weights are drawn over the present tasks: the ``T``-vector is drawn as always (the
    generator advances as in a fully labelled step, so the draws of later steps do not depend on which tasks
    were labelled) and renormalised over the present tasks, which is exactly a draw over them:
    ``softmax(z)`` restricted to a subset and renormalised is the softmax of that subset of ``z``, and a
    ``Dir(α·1_T)`` vector restricted and renormalised is ``Dir(α·1_P)``. They sum to 1; the absent tasks' are 0.
    Under accumulation the draw of the window is renormalised over each micro-batch's present tasks. RLW keeps
    no per-task state besides the draw.

    Args:
        distribution: ``"normal"`` (paper default), ``"uniform"`` (softmax of U(0, 1)) or ``"dirichlet"``.
        concentration: Dirichlet concentration (only for ``"dirichlet"``; 1 is uniform on the simplex).
        seed: generator seed; ``None`` uses the global seed.
    """

    def __init__(
        self, distribution: RandomDistribution = "normal", concentration: float = 1.0, seed: int | None = None
    ) -> None:
        super().__init__()
        if distribution not in ("normal", "uniform", "dirichlet"):
            raise ValueError(
                f"RLW distribution must be 'normal', 'uniform' or 'dirichlet', got {distribution!r}."
            )
        if (
            isinstance(concentration, bool)
            or not isinstance(concentration, (int, float))
            or not math.isfinite(concentration)
            or not concentration > 0
        ):
            raise ValueError(f"RLW concentration must be > 0 and finite, got {concentration!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(
                f"RLW seed must be an int or None (Lightning's global seed), got {type(seed).__name__} ({seed!r})."
            )
        self.distribution = distribution
        self.concentration = float(concentration)
        self.seed = seed
        self._random = SeededGenerator(seed)
        #: ``_draw[i]``: which entry of each draw goes to task ``i`` (``None``: entry ``i``); set when a
        #: checkpoint is resumed with the tasks in another order
        self._draw: list[int] | None = None
        self._drawn: Tensor | None = None  # the window's draw (before any renormalisation over present tasks)

    #: partial labels: the draw renormalised over the present tasks
    supports_absent_tasks = True

    def reset_state(self) -> None:
        super().reset_state()
        self._random.reset()  # a new run draws the same weights as a new RLW
        self._draw = None
        self._drawn = None

    def backward(self, ctx: StepContext) -> None:
        self._window_start = ctx.is_window_start
        super().backward(ctx)

    def compute_weights(self, losses: Tensor) -> Tensor:
        if self._drawn is None or self._window_start:
            drawn = random_weights(self.num_tasks, self._random.get(), self.distribution, self.concentration)
            self._drawn = drawn if self._draw is None else take_tasks(drawn, self._draw)
            self._weights = self._drawn
        return self._drawn.to(losses.device)

    def compute_present_weights(self, losses: Tensor, present: list[bool]) -> Tensor:
        """Partial labels: the window's draw renormalised over the present tasks (a draw over them), 0 for the
        absent ones."""
        w = self.compute_weights(losses)
        w = torch.where(present_mask(present, w), w, torch.zeros_like(w))
        total = w.sum()
        return w / total if bool(total > 0) else w

    def state_config(self) -> dict[str, Any]:
        """The distribution the weights (and the generator's next draws) come from."""
        config: dict[str, Any] = {"distribution": self.distribution}
        if self.distribution == "dirichlet":
            config["concentration"] = self.concentration
        return config

    def task_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "weights": None if self._drawn is None else self._drawn.cpu(),
            "draw": list(range(self.num_tasks)) if self._draw is None else list(self._draw),
        }
        state.update(self._random.state())
        return state

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        weights = state.get("weights")
        weights = None if weights is None else take_tasks(weights, order)
        saved_draw = state.get("draw", list(range(len(order))))
        if len(saved_draw) != len(order):
            raise ValueError(f"RLW: the saved draw order {saved_draw} does not have one entry per task.")
        # the task that took draw k before the resume still takes it: a resumed run with reordered tasks draws
        # the same weights per task as the uninterrupted run
        draw = [int(saved_draw[j]) for j in order]
        self._random.load(state)
        self._weights = self._drawn = weights
        self._draw = None if draw == list(range(len(draw))) else draw
