"""DB-MTL: dual-balancing multi-task learning (Lin et al., arXiv:2308.12029)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_mtl.functional.dbmtl import DBMTLState, check_dbmtl_hyperparameters, dbmtl_step
from lightning_mtl.gradients import JacobianMethod, SyncMode
from lightning_mtl.strategies._gradient_direction import Direction, GradientDirection
from lightning_mtl.task_state import take_tasks

_KEYS = ("ema", "step")


class DBMTL(GradientDirection):
    """DB-MTL: Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang & Kwok, "Dual-Balancing for Multi-Task
    Learning", arXiv:2308.12029 (v1 2023, "Dual-Balancing Multi-Task Learning"; Neural Networks 2025); LibMTL's
    ``DB_MTL`` (LibMTL is the first author's library).

    Balances the tasks twice (:func:`~lightning_mtl.functional.dbmtl.dbmtl_step`), at update ``k`` (1 at the
    first), with ``Lᵢ`` the losses and ``∇Lᵢ`` the per-task gradients of the shared parameters:

    * **loss scale**: each loss is replaced by ``log Lᵢ``, whose gradient ``gᵢ = ∇Lᵢ/Lᵢ`` does not change when
      ``Lᵢ`` is multiplied by a constant (computed as ``diag(1/L) J`` from the Jacobian and the losses of the
      global batch, so the DDP update is exact);
    * **moving average**: ``ĝᵢ ← gᵢ + βₖ(ĝᵢ − gᵢ)``, ``βₖ = β/k^σ`` (``ĝ₀ = 0``);
    * **gradient magnitude**: ``αᵢ = maxⱼ‖ĝⱼ‖ / (‖ĝᵢ‖ + 1e-8)``; the shared parameters receive ``Σᵢ αᵢĝᵢ``
      (every task's rescaled gradient has the largest norm);
    * the task-specific parameters receive ``∇Σ log Lᵢ = Σᵢ ∇Lᵢ/Lᵢ`` (LibMTL back-propagates each
      ``log Lᵢ``; its heads keep those gradients).

    The paper's equation numbers were not checked here (its text was not reachable); the rule above is
    LibMTL's ``DB_MTL`` and the paper's description (log transformation of each loss, EMA of the gradients,
    normalisation to the maximum gradient norm).

    Conventions:

    * **Defaults** ``β = 0.9``, ``σ = 0`` (LibMTL's ``DB_beta``, ``DB_beta_sigma``: a plain EMA).
    * **Positive losses**: ``log Lᵢ`` needs ``Lᵢ > 0``; a task whose loss (averaged over the accumulation window
      and the ranks) is not a finite number ``> 0`` is a ``ValueError`` naming it and its value. LibMTL takes
      ``log(Lᵢ + 1e-8)``: the shift is left out (it only matters for a loss near 0).
    * **Sum**: the update is a sum over the tasks (each term has the largest norm), as LibMTL.
    * **Logged weights**: ``train/weight/<task>`` logs ``wᵢ = αᵢ/Lᵢ``, the coefficient of ``∇Lᵢ`` in the
      update when the moving average is off (``β = 0``: the update is then ``Σ wᵢ∇Lᵢ``); with ``β > 0`` it is
      the coefficient the current ``∇Lᵢ`` would get without the history. ``train/dbmtl/scale/<task>`` logs
      ``αᵢ`` (1 for the task with the largest moving gradient).
    * **Per optimizer step**: the Jacobian and the losses are those of the global batch (averaged over ranks
      and the accumulation window), so ``Ĝ`` and ``k`` are identical on every rank. ``sync="local"``: each
      rank uses its own Jacobian and losses and ``Ĝ`` is averaged over ranks after each step (still a
      ``T × P`` all-reduce: only an approximation, not a saving).

    Memory: ``Ĝ`` is ``T × P`` in the Jacobian's dtype on its device. ``Ĝ`` and ``k`` are saved in
    checkpoints (``Ĝ`` on the CPU) and restored by task name.

    Partial labels: a step where some tasks are labelled on no rank is the update above on the present tasks
    only: their rows of ``Ĝ`` move, ``αᵢ`` is taken against the largest present ``‖ĝⱼ‖``, and the shared
    parameters receive ``Σ_present αᵢĝᵢ``. The absent tasks' rows of ``Ĝ`` stay bit-for-bit as they were (a
    stale average is not added to the update), their logged weight and head coefficient are 0. ``k`` counts
    every update. When the first update has absent tasks their rows start at 0 (``ĝ₀ = 0``).

    Args:
        beta: ``β ∈ [0, 1)``, the memory of the moving average (default 0.9; 0: no averaging).
        beta_sigma: ``σ ≥ 0``, decay exponent of ``βₖ = β/k^σ`` (default 0).
        sync, jacobian: see :class:`~lightning_mtl.strategies._gradient_direction.GradientDirection`.
    """

    supports_absent_tasks = True

    def __init__(
        self,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        *,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        self.beta, self.beta_sigma = check_dbmtl_hyperparameters(beta, beta_sigma)
        self._state: DBMTLState | None = None
        super().__init__(sync=sync, jacobian=jacobian)

    # ------------------------------------------------------------------ state, read-only views
    @property
    def ema(self) -> Tensor | None:
        """``Ĝ [T, P]``, the moving average of the log-losses' gradients; ``None`` before the first update."""
        return None if self._state is None else self._state.ema

    @property
    def updates(self) -> int:
        """``k``, the number of updates taken."""
        return 0 if self._state is None else self._state.step

    # ------------------------------------------------------------------ the method
    def compute_direction(self, jacobian: Tensor, losses: Tensor) -> Direction:
        names = list(self.task_names)
        result = dbmtl_step(
            jacobian, losses, self._state, beta=self.beta, beta_sigma=self.beta_sigma, names=names
        )
        self._state = result.state
        L = losses.detach().float().to(result.scales.device)
        for name, alpha in zip(names, result.scales.unbind()):
            self._metrics[f"train/dbmtl/scale/{name}"] = alpha
        return Direction(result.direction, result.scales / L, 1.0 / L)

    def method_config(self) -> dict[str, Any]:
        """None: ``Ĝ`` is a moving average of the log-losses' gradients whatever ``β`` (which changes how it
        moves, not what it means)."""
        return {}

    def method_state(self) -> dict[str, Any]:
        if self._state is None:
            return {key: None for key in _KEYS}
        return dict(zip(_KEYS, self._state))

    def load_method_state(self, state: Mapping[str, Any], order: Sequence[int] | None = None) -> None:
        """Restore :meth:`method_state`; ``order[i]`` is the saved index of task ``i`` (``None``: same order).
        The rows of ``Ĝ`` are reordered."""
        ema, step = state.get("ema"), state.get("step")
        if ema is None:
            self._state = None
            return
        if step is None:
            raise ValueError(
                "DBMTL: the saved state has the moving average but not its step count: the checkpoint is "
                "incomplete. Start a new fit without ckpt_path."
            )
        ema = ema.detach()
        if order is not None:
            ema = take_tasks(ema, order)
        self._state = DBMTLState(ema, int(step))

    def method_task_dims(self) -> dict[str, tuple[int, ...]]:
        """The rows of ``Ĝ`` are per task; ``k`` counts every update."""
        return {"ema": (0,)}

    def method_absent_fill(self) -> dict[str, float]:
        """``ĝ₀ = 0``."""
        return {"ema": 0.0}

    def task_state(self) -> dict[str, Any]:
        """The base's checkpoint state, with ``Ĝ`` copied to the CPU (a checkpoint loads on any device)."""
        state = super().task_state()
        ema = state["method"].get("ema")
        if isinstance(ema, Tensor):
            state["method"]["ema"] = ema.detach().cpu()
        return state
