"""UPGrad and DualProj: projections onto the dual cone of the task gradients (Quinton & Rey 2024)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_mtl.functional.gradient_methods import dualproj_weights, upgrad_weights
from lightning_mtl.strategies._gradient_based import GradientMode, GradientWeighting, JacobianMethod, SyncMode
from lightning_mtl.strategies._preference import Preference, check_preference, preference_tensor
from lightning_mtl.task import Task


class _DualCone(GradientWeighting):
    heads = "plain"

    def __init__(
        self,
        preference: Preference,
        reg_eps: float,
        mode: GradientMode,
        update_every: int,
        sync: SyncMode,
        jacobian: JacobianMethod,
    ) -> None:
        name = type(self).__name__
        check_preference(preference, name)
        if isinstance(reg_eps, bool) or not isinstance(reg_eps, (int, float)) or not reg_eps > 0:
            raise ValueError(f"{name} reg_eps must be a number > 0, got {reg_eps!r}.")
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian)
        self.preference = preference
        self.reg_eps = float(reg_eps)
        self._preference: Tensor | None = None

    def bind(self, tasks: Sequence[Task]) -> None:
        super().bind(tasks)
        self._preference = preference_tensor(self.preference, self.task_names, type(self).__name__)


class UPGrad(_DualCone):
    """UPGrad: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
    (https://arxiv.org/abs/2406.16232).

    Each task gradient (scaled by its preference, ``1/T`` by default) is projected onto the dual cone of the
    task gradients ``{v : gⱼ·v ≥ 0 ∀j}`` and the projections are summed, so the update conflicts with no
    task. With the default preference the update is the *mean* of the projections (TorchJD's convention:
    weights sum to about 1). Weights come from the trace-normalised Gramian plus ``reg_eps·I``
    (:func:`~lightning_mtl.functional.upgrad.upgrad_weights`) and apply to the shared parameters; the
    task-specific parameters get the plain gradient of ``Σ Lᵢ``, as TorchJD's ``mtl_backward``.

    Args:
        preference: per-task preference, a ``task -> value`` mapping or a sequence in task order (default
            ``1/T`` for every task).
        reg_eps: ridge added to the normalised Gramian (default 1e-4, as TorchJD).
        mode: ``"parameters"`` (default) or ``"representation"``.
        update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    def __init__(
        self,
        preference: Preference = None,
        reg_eps: float = 1e-4,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        super().__init__(preference, reg_eps, mode, update_every, sync, jacobian)

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        return upgrad_weights(stat, preference=self._preference, reg_eps=self.reg_eps)


class DualProj(_DualCone):
    """DualProj: the mean gradient projected onto the dual cone of the task gradients: equation 11 of
    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017
    (https://arxiv.org/abs/1706.08840), applied to multi-task learning as in Quinton & Rey, "Jacobian Descent
    for Multi-Objective Optimization", 2024 (https://arxiv.org/abs/2406.16232).

    The combination ``Σ pᵢgᵢ`` (``p = 1/T`` by default: the mean gradient) is projected onto
    ``{v : gⱼ·v ≥ 0 ∀j}`` (:func:`~lightning_mtl.functional.dualproj.dualproj_weights`) on the shared
    parameters; the task-specific parameters get the plain gradient of ``Σ Lᵢ``, as TorchJD's
    ``mtl_backward``.

    Args:
        preference: the combination to project, a ``task -> value`` mapping or a sequence in task order
            (default ``1/T``).
        reg_eps: ridge added to the normalised Gramian (default 1e-4, as TorchJD).
        mode: ``"parameters"`` (default) or ``"representation"``.
        update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    def __init__(
        self,
        preference: Preference = None,
        reg_eps: float = 1e-4,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        super().__init__(preference, reg_eps, mode, update_every, sync, jacobian)

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        return dualproj_weights(stat, preference=self._preference, reg_eps=self.reg_eps)
