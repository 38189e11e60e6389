"""Which parameters the tasks share, read from the autograd graph of one training step: no backward is run.

:func:`find_sharing` walks each task loss's graph (``grad_fn`` → ``next_functions`` → the ``AccumulateGrad`` nodes
of the leaf parameters) and returns the trainable parameters reached by two or more tasks (shared), by exactly one
(task-specific) and by none. :class:`~lightning_mtl.MultiTaskModule` uses it on the first training step when a
module neither overrides ``shared_parameters()`` nor holds a :class:`~lightning_mtl.nn.MultiTaskArchitecture`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

__all__ = ["Sharing", "find_sharing", "reached_leaves"]


def reached_leaves(loss: Tensor) -> set[int]:
    """The ``id`` of every leaf tensor (parameter) that ``loss``'s autograd graph reaches."""
    found: set[int] = set()
    stack = [loss.grad_fn]
    seen: set[int] = set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        variable = getattr(fn, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if isinstance(variable, Tensor):
            found.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


@dataclass
class Sharing:
    """What :func:`find_sharing` found, in ``module.named_parameters()`` order (trainable parameters only)."""

    shared: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    task_specific: dict[str, list[str]] = field(default_factory=dict)
    unreached: list[str] = field(default_factory=list)

    @property
    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.shared]

    @property
    def shared_elements(self) -> int:
        return sum(p.numel() for _, p in self.shared)

    def top_level_modules(self) -> list[str]:
        """The top-level submodule names (``encoder`` for ``encoder.0.weight``) that hold shared parameters."""
        names: list[str] = []
        for name, _ in self.shared:
            top = name.split(".", 1)[0] if "." in name else "(module itself)"
            if top not in names:
                names.append(top)
        return names

    def summary(self) -> str:
        """One line: how many shared tensors and elements, in which top-level modules."""
        return (
            f"{len(self.shared)} parameter tensor(s), {self.shared_elements:,} element(s), reached by two or more "
            f"tasks, in {', '.join(self.top_level_modules()) or 'no module'}"
        )


def find_sharing(module: nn.Module, losses: Mapping[str, Tensor]) -> Sharing:
    """The trainable parameters of ``module`` that the graphs of two or more of ``losses`` reach (shared), of
    exactly one (listed per task) and of none."""
    reached = {task: reached_leaves(loss) for task, loss in losses.items() if isinstance(loss, Tensor)}
    sharing = Sharing(task_specific={task: [] for task in reached})
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        tasks = [task for task, ids in reached.items() if id(p) in ids]
        if len(tasks) >= 2:
            sharing.shared.append((name, p))
        elif len(tasks) == 1:
            sharing.task_specific[tasks[0]].append(name)
        else:
            sharing.unreached.append(name)
    return sharing


def describe_unreached(owner: str, sharing: Sharing) -> str | None:
    """The warning for trainable parameters reached by no task (``None`` when every one is reached)."""
    if not sharing.unreached:
        return None
    shown = ", ".join(repr(n) for n in sharing.unreached[:8])
    more = f" and {len(sharing.unreached) - 8} more" if len(sharing.unreached) > 8 else ""
    return (
        f"{owner}: {len(sharing.unreached)} trainable parameter tensor(s) are reached by no task loss: {shown}{more}. "
        "They get no gradient and never train: remove them, freeze them (requires_grad=False), or use them in "
        "task_losses."
    )
