"""GradVac: gradient vaccine (Wang et al. 2021)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_mtl.functional.gradient_methods import gradvac_weights
from lightning_mtl.strategies._gradient_based import GradientMode, GradientWeighting, JacobianMethod, SyncMode
from lightning_mtl.task_state import take_tasks


class GradVac(GradientWeighting):
    """GradVac: Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021 (https://arxiv.org/abs/2010.05874), Algorithm 1.

    A generalisation of PCGrad: for each task ``i`` and each other task ``j`` (random order), when the cosine
    ``φ`` between ``gᵢᴾᶜ`` and ``gⱼ`` is below the target ``φ̂ᵢⱼ``, ``gⱼ`` is added to ``gᵢᴾᶜ`` until their cosine
    is ``φ̂ᵢⱼ``; the targets are EMAs ``φ̂ᵢⱼ ← (1−β)φ̂ᵢⱼ + βφ`` (initialised to 0). The update is the **sum**
    ``Σ gᵢᴾᶜ``. On the whole model this is a combination ``Σ wᵢgᵢ`` computed on the Gramian
    (:func:`~lightning_mtl.functional.gradvac.gradvac_weights`), applied to the shared parameters; the
    task-specific parameters get the plain gradient of ``Σ Lᵢ`` (as LibMTL and TorchJD).
    The targets ``[T, T]`` and the generator are saved in checkpoints and identical on every rank.

    Partial labels: a step with absent tasks runs Algorithm 1 on the present tasks only (their Gramian block,
    the random order drawn over them): the absent tasks get weight 0 and their rows and columns of ``φ̂``
    (every target involving them) stay untouched; the present pairs' targets move as usual. When the first
    update has absent tasks, the targets they are part of start at the paper's initial value 0.

    Args:
        beta: EMA rate of the targets (default 1e-2, a slow EMA; LibMTL and TorchJD default to 0.5, which
            tracks the latest cosines much faster; the paper leaves β as a hyper-parameter).
        eps: guard of ``√(1−φ̂²)`` (default 1e-8).
        seed: seed of the task-order generator (``None``: the global seed).
        mode: ``"parameters"`` (default; the whole shared model is one group) or ``"representation"``.
        update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    random = True
    heads = "plain"

    def __init__(
        self,
        beta: float = 1e-2,
        eps: float = 1e-8,
        seed: int | None = None,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac beta must be a number in [0, 1], got {beta!r}.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"GradVac eps must be a finite number > 0, got {eps!r}.")
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian, seed=seed)
        self.beta = float(beta)
        self.eps = float(eps)
        self._targets: Tensor | None = None

    @property
    def targets(self) -> Tensor | None:
        """The EMA cosine targets ``φ̂`` (``[T, T]``, float64), ``None`` before the first update."""
        return self._targets

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        weights, targets = gradvac_weights(
            stat, self._targets, beta=self.beta, eps=self.eps, generator=self.generator
        )
        self._targets = targets.detach().cpu().double()
        return weights

    def method_config(self) -> dict[str, Any]:
        """None: the targets are cosines of the ``mode``'s gradients (``mode`` is in the base's configuration);
        ``beta`` and ``eps`` change how they move, not what they mean."""
        return {}

    def method_state(self) -> dict[str, Any]:
        return {"targets": None if self._targets is None else self._targets.clone()}

    def method_task_dims(self) -> dict[str, tuple[int, ...]]:
        """The targets are ``T × T`` (the last two dimensions, after any per-group one): a step on the present
        tasks updates their block only."""
        lead = 0 if self._targets is None else self._targets.dim() - 2
        return {"targets": (lead, lead + 1)}

    def method_absent_fill(self) -> dict[str, float]:
        """The targets start at 0 (the paper's initialisation)."""
        return {"targets": 0.0}

    def load_method_state(self, state: Mapping[str, Any], order: Sequence[int] | None = None) -> None:
        """Restore :meth:`method_state`; ``order[i]`` is the saved index of task ``i`` (``None``: same order).
        The ``[T, T]`` targets are reordered on both dimensions."""
        targets = state.get("targets")
        if targets is not None:
            targets = targets.detach().cpu().double()
            if order is None and self._task_names is not None:
                order = range(self.num_tasks)
            targets = targets.clone() if order is None else take_tasks(targets, order, (0, 1)).clone()
        self._targets = targets
