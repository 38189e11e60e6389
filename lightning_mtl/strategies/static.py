"""Fixed, user-given task weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from lightning_mtl.functional.loss_weighting import static_weights
from lightning_mtl.strategies._loss_based import LossWeighting


class StaticWeighting(LossWeighting):
    """Fixed weights: minimise ``Σ wᵢLᵢ``.

    Args:
        weights: a ``task -> weight`` mapping naming every task, or a list in task order. ``None`` (the
            default) takes each :attr:`Task.weight`. Weights must be finite, ``>= 0`` and not all zero.
    """

    #: partial labels: an absent task gets weight 0 (the others keep theirs)
    supports_absent_tasks = True

    def __init__(self, weights: Mapping[str, float] | Sequence[float] | None = None) -> None:
        super().__init__()
        if weights is not None:
            values = list(weights.values()) if isinstance(weights, Mapping) else list(weights)
            bad = [
                v
                for v in values
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf")
            ]
            if bad:
                raise ValueError(
                    f"StaticWeighting weights must be finite numbers >= 0, got {bad} in {weights}."
                )
            if not any(v > 0 for v in values):
                raise ValueError(
                    f"StaticWeighting weights are all zero ({weights}): no task would be trained."
                )
        self._given = dict(weights) if isinstance(weights, Mapping) else (list(weights) if weights else None)
        self._fixed: Tensor | None = None

    def bind(self, tasks) -> None:  # noqa: ANN001 - see MTLStrategy.bind
        super().bind(tasks)
        names = self.task_names
        given = self._given
        if given is None:
            values = [t.weight for t in tasks]
        elif isinstance(given, dict):
            unknown = sorted(set(given) - set(names))
            missing = [n for n in names if n not in given]
            if unknown:
                raise ValueError(
                    f"StaticWeighting got weights for unknown task(s) {unknown}; the module's tasks are {list(names)}."
                )
            if missing:
                raise ValueError(
                    f"StaticWeighting has no weight for task(s) {missing}; give one for every task of {list(names)}."
                )
            values = [given[n] for n in names]
        else:
            if len(given) != len(names):
                raise ValueError(
                    f"StaticWeighting got {len(given)} weights for {len(names)} tasks {list(names)}; pass one per "
                    "task (in task order) or a {task: weight} mapping."
                )
            values = given
        self._fixed = static_weights(values)

    def compute_weights(self, losses: Tensor) -> Tensor:
        assert self._fixed is not None
        return self._fixed.to(losses.device)
