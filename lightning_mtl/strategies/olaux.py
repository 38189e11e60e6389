"""OL-AUX: online auxiliary-task weighting (Lin et al. 2019)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mtl.functional.auxiliary import olaux_products, olaux_update
from lightning_mtl.strategies._auxiliary import AuxiliaryWeighting
from lightning_mtl.strategies._gradient_based import GradientMode, JacobianMethod, SyncMode
from lightning_mtl.task_state import take_tasks


class OLAUX(AuxiliaryWeighting):
    """OL-AUX: Lin, Baweja, Kantor & Held, "Adaptive Auxiliary Task Weighting for Reinforcement Learning",
    NeurIPS 2019 (https://papers.nips.cc/paper/2019/hash/0e900ad84f63618452210ab8baae0218-Abstract.html).

    The model minimises ``L_main + Σₖ wₖL_aux,k`` (every parameter, heads included: ``heads="weighted"``) and the
    auxiliary weights follow the main loss *after* the updates they caused: one step of θ gives
    ``∂L_main(θ_{t+1})/∂wₖ = −α∇L_main(θ_t)ᵀ∇L_aux,k(θ_t)``; over ``N`` steps the paper sums these terms and
    updates ``wₖ ← wₖ − β·∂L_main(θ_{t+N})/∂wₖ``, i.e. every ``N`` steps::

        wₖ ← wₖ + β Σ_{j<N} ∇L_main(θ_{t−j})ᵀ∇L_aux,k(θ_{t−j})

    (the θ learning rate α absorbed into β). Dot products are taken on the shared parameters from the Gramian of
    the global batch, so every rank accumulates the same numbers: exact under DDP. With several main tasks,
    ``∇L_main`` is the sum of their gradients (main weights stay 1).

    Conventions and unverified points: the weights start at ``init`` (1, an unverified recollection of the
    paper); ``N = 5`` follows a third-party port (not confirmed in the paper); ``β = 0.01`` is our default
    (the right value scales with the squared gradient norms); the weights are clamped at 0 (``nonnegative``; a
    negative weight would ascend the auxiliary loss); the paper's loss-balancing of the auxiliary losses is not
    applied (normalise them in ``task_losses`` if their scales differ widely). ``N`` counts optimizer steps
    on which the weights are computed (``update_every`` > 1 counts windows of that many steps).

    State (checkpointed by task name, identical on every rank): the weights ``w`` and the accumulated
    products ``[T]`` (float64), and the number of steps accumulated since the last update.

    Example::

        tasks = ["reward", Task("next_frame", role="auxiliary")]
        trainer = L.Trainer(callbacks=[OLAUX(beta=0.01, horizon=5)])

    Args:
        beta: step size of the weight update, > 0 (default 0.01).
        horizon: ``N``, the number of steps whose products are summed before each weight update (default 5).
        init: initial auxiliary weight, >= 0 (default 1).
        nonnegative: clamp the auxiliary weights at 0 (default ``True``).
        mode, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    def __init__(
        self,
        beta: float = 0.01,
        horizon: int = 5,
        init: float = 1.0,
        nonnegative: bool = True,
        *,
        mode: GradientMode = "parameters",
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        if (
            isinstance(beta, bool)
            or not isinstance(beta, (int, float))
            or not (math.isfinite(beta) and beta > 0)
        ):
            raise ValueError(f"OLAUX beta must be a finite number > 0, got {beta!r}.")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(
                f"OLAUX horizon must be an int >= 1 (N, steps per weight update), got {horizon!r}."
            )
        if (
            isinstance(init, bool)
            or not isinstance(init, (int, float))
            or not (math.isfinite(init) and init >= 0)
        ):
            raise ValueError(f"OLAUX init must be a finite number >= 0, got {init!r}.")
        if not isinstance(nonnegative, bool):
            raise ValueError(f"OLAUX nonnegative must be True or False, got {nonnegative!r}.")
        super().__init__(mode=mode, sync=sync, jacobian=jacobian)
        self.beta = float(beta)
        self.horizon = horizon
        self.init = float(init)
        self.nonnegative = nonnegative
        self._aux: Tensor | None = None
        self._acc: Tensor | None = None
        self._count = 0

    @property
    def aux_weights(self) -> dict[str, float] | None:
        """The current OL-AUX weights by task (main tasks 1), ``None`` before the strategy is attached."""
        if self._task_names is None:
            return None
        self._ensure()
        assert self._aux is not None
        return dict(zip(self.task_names, self._aux.tolist()))

    def _ensure(self) -> None:
        if self._aux is None or self._acc is None:
            main = self.main_mask
            self._aux = torch.where(main, 1.0, self.init).double()
            self._acc = torch.zeros(len(main), dtype=torch.float64)

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        self._ensure()
        assert self._aux is not None and self._acc is not None
        main = self.main_mask
        weights = torch.where(main, 1.0, self._aux)  # this step uses the current weights
        self._acc = self._acc + olaux_products(stat, main)
        self._count += 1
        if self._count >= self.horizon:
            self._aux = olaux_update(self._aux, self._acc, main, beta=self.beta, nonnegative=self.nonnegative)
            self._acc = torch.zeros_like(self._acc)
            self._count = 0
        return weights

    def method_config(self) -> dict[str, Any]:
        return {**super().method_config(), "horizon": self.horizon}

    def method_state(self) -> dict[str, Any]:
        if self._task_names is None:
            return {}
        self._ensure()
        assert self._aux is not None and self._acc is not None
        return {"aux_weights": self._aux.clone(), "accumulated": self._acc.clone(), "count": self._count}

    def method_task_dims(self) -> dict[str, tuple[int, ...]]:
        return {"aux_weights": (0,), "accumulated": (0,)}

    def load_method_state(self, state: Mapping[str, Any], order: Sequence[int] | None = None) -> None:
        """Restore :meth:`method_state`; ``order[i]`` is the saved index of task ``i`` (``None``: same order)."""
        aux, acc = state.get("aux_weights"), state.get("accumulated")
        if aux is None or acc is None:
            self._aux = self._acc = None
            self._count = 0
            return
        aux, acc = aux.detach().cpu().double(), acc.detach().cpu().double()
        if order is not None:
            aux, acc = take_tasks(aux, order), take_tasks(acc, order)
        self._aux, self._acc = aux.clone(), acc.clone()
        self._count = int(state.get("count", 0))
