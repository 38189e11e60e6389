"""PCGrad: gradient surgery by projecting conflicting gradients (Yu et al. 2020)."""

from __future__ import annotations

from torch import Tensor

from lightning_mtl.functional.gradient_methods import pcgrad_weights
from lightning_mtl.strategies._gradient_based import GradientMode, GradientWeighting, JacobianMethod, SyncMode


class PCGrad(GradientWeighting):
    """PCGrad: Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS
    2020 (https://arxiv.org/abs/2001.06782), Algorithm 1.

    Each task gradient is projected onto the normal plane of every other task's (original) gradient it
    conflicts with, taken in a random order; the update is the **sum** of the projected gradients on the
    shared parameters. The paper has no hyper-parameter. The projected sum is a combination ``Σ wᵢ∇Lᵢ`` of
    the original gradients: the strategy computes ``w`` on the Gramian
    (:func:`~lightning_mtl.functional.pcgrad.pcgrad_weights`) and applies it to the shared parameters only;
    the task-specific parameters get the plain gradient of ``Σ Lᵢ`` (``heads = "plain"``), as in LibMTL,
    TorchJD's ``mtl_backward`` and the Nash-MTL and CAGrad authors' PCGrad ports. One backward pass
    (see :class:`~lightning_mtl.strategies.GradientWeighting`).

    The random orders are drawn from a CPU generator seeded with ``seed`` (default: Lightning's global seed,
    else 0): identical on every rank, independent of the world size, saved in checkpoints.

    Args:
        seed: seed of the task-order generator (``None``: the global seed).
        mode: ``"parameters"`` (default, the paper) or ``"representation"`` (gradients w.r.t. the marked
            shared representation).
        update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    random = True
    heads = "plain"

    def __init__(
        self,
        seed: int | None = None,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian, seed=seed)

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        return pcgrad_weights(stat, generator=self.generator)
