"""Equal weighting: the baseline every method is compared with."""

from __future__ import annotations

from torch import Tensor

from lightning_mtl.strategies._loss_based import LossWeighting


class EqualWeighting(LossWeighting):
    """Equal weighting: minimise the **sum** of the task losses, ``Σ Lᵢ`` (every weight is 1, sum ``T``).

    The sum, not the mean: the update is ``Σ ∇Lᵢ``. It is the module's default when no strategy callback
    is attached (and all tasks have ``weight=1``). It ignores :attr:`Task.weight`; use
    :class:`~lightning_mtl.strategies.StaticWeighting` for fixed, unequal weights.
    No hyper-parameters.
    """

    #: partial labels: an absent task gets weight 0 (the others keep theirs)
    supports_absent_tasks = True

    def compute_weights(self, losses: Tensor) -> Tensor:
        return losses.new_ones(losses.shape)

    def bind(self, tasks) -> None:  # noqa: ANN001 - see MTLStrategy.bind
        super().bind(tasks)
        unequal = {t.name: t.weight for t in tasks if t.weight != 1.0}
        if unequal:
            import warnings

            warnings.warn(
                f"EqualWeighting ignores Task weights {unequal}; attach StaticWeighting() to use them.",
                stacklevel=2,
            )
