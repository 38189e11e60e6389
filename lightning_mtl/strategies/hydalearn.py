"""HydaLearn: per-batch auxiliary weights from main-task gains (Verboven et al. 2020)."""

from __future__ import annotations

import math

from torch import Tensor

from lightning_mtl.functional.auxiliary import hydalearn_weights
from lightning_mtl.strategies._auxiliary import AuxiliaryWeighting
from lightning_mtl.strategies._gradient_based import GradientMode, JacobianMethod, SyncMode


class HydaLearn(AuxiliaryWeighting):
    """HydaLearn: Verboven, Chaudhary, Berrevoets & Verbeke, "HydaLearn: Highly Dynamic Task Weighting for
    Multi-task Learning with Auxiliary Tasks", arXiv:2008.11643 (2020; Applied Intelligence 53, 2023).

    Weights are recomputed on every mini-batch from each auxiliary task's *gain on the main task*: the decrease
    of the main loss that a gradient step on that task alone would bring. This implementation uses the
    **first-order gain** ``δₖ = η g_mainᵀgₖ`` (the main task's own step gains ``η‖g_main‖²``) and weights each
    auxiliary task by its gain relative to the main task's::

        w_main = 1,    wₖ = max(0, g_mainᵀgₖ / ‖g_main‖²)     (capped at ``max_weight``)

    so an auxiliary task whose step would raise the main loss gets weight 0 on that batch, and one that helps
    as much as the main task itself gets weight 1 (η cancels: no learning-rate argument). The loss is
    ``Σ wᵢLᵢ`` on every parameter (heads included: ``heads="weighted"``).

    **Why first order, not the lookahead step.** The paper measures the gain with an actual lookahead (a step
    per task, then the main loss re-evaluated): that takes one extra forward of the main loss per auxiliary
    task per batch, which a strategy cannot run (the module owns the forward; DESIGN.md) and which would need
    per-rank parameter copies under DDP. The first-order gain is the lookahead gain's limit for small η, needs
    only the Gramian of the per-task gradients, and is therefore exact under DDP (weights from the Gramian of
    the global batch).

    **Unverified** (only the abstract could be read): the paper's exact normalisation of the weights (here:
    relative to the main task's gain, main fixed at 1) and whether it clips negative gains (here: to 0). With
    several main tasks, ``g_main`` is the sum of their gradients.

    Example::

        tasks = ["mortality", Task("length_of_stay", role="auxiliary")]
        trainer = L.Trainer(callbacks=[HydaLearn()])

    Args:
        max_weight: upper bound of an auxiliary weight (default ``None``: no cap). A cap keeps a large
            auxiliary gradient that is well aligned from dominating the update.
        mode, update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    def __init__(
        self,
        max_weight: float | None = None,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        if max_weight is not None and (
            isinstance(max_weight, bool)
            or not isinstance(max_weight, (int, float))
            or not (math.isfinite(max_weight) and max_weight > 0)
        ):
            raise ValueError(f"HydaLearn max_weight must be a finite number > 0 or None, got {max_weight!r}.")
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian)
        self.max_weight = None if max_weight is None else float(max_weight)

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        return hydalearn_weights(stat, self.main_mask, max_weight=self.max_weight)
