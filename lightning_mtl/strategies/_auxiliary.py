"""Shared wiring of the auxiliary-learning strategies (:class:`~lightning_mtl.strategies.gcs.GCS`,
:class:`~lightning_mtl.strategies.olaux.OLAUX`, :class:`~lightning_mtl.strategies.hydalearn.HydaLearn`).

They are :class:`~lightning_mtl.strategies.GradientWeighting` methods whose weights come from the Gramian of
the per-task gradients and the tasks' roles (``Task(name, role="auxiliary")``). This base only checks, when
the strategy is attached, that the module has at least one main and one auxiliary task, and gives the
subclasses the boolean mask of the main tasks (of the tasks present this step, under partial labels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mtl.strategies._gradient_based import GradientWeighting
from lightning_mtl.task import Task


class AuxiliaryWeighting(GradientWeighting):
    """Base of the gradient strategies that weight auxiliary tasks by how they serve the main task(s)."""

    def bind(self, tasks: Sequence[Task]) -> None:
        super().bind(tasks)
        check_roles(type(self).__name__, tasks)

    @property
    def main_mask(self) -> Tensor:
        """``[T]`` boolean CPU mask of the main tasks, in the order of :attr:`task_names` (during a step with
        absent tasks: of the present tasks)."""
        tasks = self._tasks
        if tasks is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a MultiTaskModule yet.")
        return torch.tensor([t.role == "main" for t in tasks], dtype=torch.bool)

    def method_config(self) -> dict[str, object]:
        """The main tasks' names (sorted): the state's meaning depends on which tasks are auxiliary."""
        tasks = self._tasks or ()
        return {"main_tasks": sorted(t.name for t in tasks if t.role == "main")}


def check_roles(method: str, tasks: Sequence[Task]) -> None:
    """Raise a ``ValueError`` unless ``tasks`` has at least one main and one auxiliary task."""
    roles = {t.name: t.role for t in tasks}
    if "main" not in roles.values() or "auxiliary" not in roles.values():
        raise ValueError(
            f"{method} weights auxiliary tasks by how they help the main task(s): it needs at least one main and "
            f"one auxiliary task, got roles {roles}. Declare the helpers with Task(name, role='auxiliary') in the "
            "module's tasks, or use a multi-task strategy (e.g. EqualWeighting, PCGrad) for tasks that are all "
            "results."
        )
