"""MGDA / MGDA-UB: multiple-gradient descent (Sener & Koltun 2018)."""

from __future__ import annotations

from torch import Tensor

from lightning_mtl.functional.gradient_methods import mgda_weights
from lightning_mtl.functional.mgda import MGDANormalization
from lightning_mtl.strategies._gradient_based import GradientMode, GradientWeighting, JacobianMethod, SyncMode

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(GradientWeighting):
    """MGDA: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
    (https://arxiv.org/abs/1810.04650).

    The update is the minimum-norm point of the convex hull of the task gradients: ``w = argmin_{w∈Δ}
    ‖Σ wᵢgᵢ‖²`` (weights on the simplex, summing to 1 as in the official code), solved exactly on the
    Gramian (:func:`~lightning_mtl.functional.mgda.mgda_weights`), then ``Σ wᵢLᵢ`` is back-propagated once:
    the task-specific parameters get ``wᵢ∇Lᵢ`` too, as in the official code (intel-isl/MultiObjectiveOptimization
    back-propagates ``Σ scaleₜ·lossₜ``).

    ``mode="representation"`` is **MGDA-UB** (the paper's upper bound, section 3.3): the gradients are taken
    w.r.t. the shared representation marked with ``z = self.shared_representation(z)`` in ``task_losses``,
    so the per-task backward passes stop at the heads and their cost does not depend on the encoder.
    ``mode="parameters"`` (default) uses the gradients of ``shared_parameters()``.

    Args:
        normalization: gradient normalisation of the official code, used only to find ``w``: ``"none"``
            (default), ``"l2"``, ``"loss"`` or ``"loss+"`` (their CelebA setting); the loss-based ones use
            the losses averaged over ranks.
        mode: ``"parameters"`` or ``"representation"`` (MGDA-UB).
        update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    def __init__(
        self,
        normalization: MGDANormalization = "none",
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"MGDA normalization must be one of {_NORMALIZATIONS}, got {normalization!r}.")
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian)
        self.normalization = normalization

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        return mgda_weights(stat, normalization=self.normalization, losses=losses)
