"""Aligned-MTL: independent component alignment (Senushkin et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mtl.functional.aligned_mtl import AlignedMTLScale
from lightning_mtl.functional.gradient_methods import aligned_mtl_weights
from lightning_mtl.strategies._gradient_based import GradientMode, GradientWeighting, JacobianMethod, SyncMode
from lightning_mtl.strategies._preference import Preference, check_preference, preference_tensor
from lightning_mtl.task import Task

_SCALES = ("min", "median", "rmse")


_GRADIENT_EPS = torch.finfo(torch.float32).eps


class AlignedMTL(GradientWeighting):
    """Aligned-MTL: Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023 (https://arxiv.org/abs/2305.19000), Algorithm 1.

    The task gradients are aligned into orthogonal components of equal norm (condition number 1) through
    the eigendecomposition of their Gramian ``G = VΛVᵀ``: ``α = B·w`` with ``B = √σ·VΛ^(−½)Vᵀ``
    (:func:`~lightning_mtl.functional.aligned_mtl.aligned_mtl_weights`), applied to the shared parameters;
    the task-specific parameters get the plain gradient of ``Σ Lᵢ``, as in the official code
    (SamsungLabs/MTL, ``update_decoder_grads=True``, ``scale_decoder_grad=False``). ``w = 1`` by default: the **sum** of the aligned gradients, as the official code (TorchJD uses
    ``1/T``). The paper also offers the representation variant (Aligned-MTL-UB): ``mode="representation"``.

    Args:
        scale_mode: ``σ`` = the smallest kept eigenvalue (``"min"``, default), the median (``"median"``) or the
            mean (``"rmse"``).
        preference: task weights ``w``, a ``task -> value`` mapping or a sequence in task order (default 1).
        mode: ``"parameters"`` (default) or ``"representation"`` (Aligned-MTL-UB).
        update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    heads = "plain"

    def __init__(
        self,
        scale_mode: AlignedMTLScale = "min",
        preference: Preference = None,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        if scale_mode not in _SCALES:
            raise ValueError(f"AlignedMTL scale_mode must be one of {_SCALES}, got {scale_mode!r}.")
        check_preference(preference, "AlignedMTL")
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian)
        self.scale_mode = scale_mode
        self.preference = preference
        self._preference: Tensor | None = None

    def bind(self, tasks: Sequence[Task]) -> None:
        super().bind(tasks)
        self._preference = preference_tensor(self.preference, self.task_names, "AlignedMTL")

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        # the per-task gradients are float32 (the module stacks the losses in float32): drop what is rounding
        return aligned_mtl_weights(
            stat, scale_mode=self.scale_mode, preference=self._preference, eps=_GRADIENT_EPS
        )
