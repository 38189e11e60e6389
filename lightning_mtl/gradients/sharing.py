"""Which parameters the tasks share, read from the autograd graph of one training step: no backward is run.

:func:`find_sharing` walks each task loss's graph (``grad_fn`` → ``next_functions`` → the ``AccumulateGrad`` nodes
of the leaf parameters) and returns the trainable parameters reached by two or more tasks (shared), by exactly one
(task-specific) and by none. Under FSDP1 (``use_orig_params=True``) a unit's parameters are views of one flat
parameter: each original parameter is found from the output of the flat parameter's split that the graph
reaches. :class:`~lightning_mtl.MultiTaskModule` uses it on the first training step when a module neither
overrides ``shared_parameters()`` nor holds a :class:`~lightning_mtl.nn.MultiTaskArchitecture`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

__all__ = ["Sharing", "find_sharing", "reached_leaves"]


def reached_leaves(loss: Tensor, originals: dict[int, Tensor] | None = None) -> set[int]:
    """The ``id`` of every leaf tensor (parameter) that ``loss``'s autograd graph reaches, and of every original
    parameter of an FSDP1 flat parameter that it reaches (see :func:`_flat_piece`); ``originals`` receives the
    original parameter of each such id (its module's view during the step is not the parameter itself)."""
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
        for next_fn, index in fn.next_functions:
            if next_fn is not None and type(next_fn).__name__.startswith("SplitWithSizesBackward"):
                piece = _flat_piece(next_fn, index)
                for t in piece:
                    found.add(id(t))
                    if originals is not None:
                        originals[id(t)] = piece[0]
            stack.append(next_fn)
    return found


def _flat_piece(split: object, index: int) -> list[Tensor]:
    """FSDP1 (``use_orig_params=True``): the original parameter that output ``index`` of ``split`` (the split of an
    unsharded ``FlatParameter`` into its parameters' views, alignment padding included) is — the parameter and the
    view its module holds between the forward and the backward — or nothing when ``split`` is not such a split."""
    nexts = split.next_functions  # type: ignore[attr-defined]
    if len(nexts) != 1 or nexts[0][0] is None:
        return []
    flat = getattr(nexts[0][0], "variable", None)
    params = getattr(flat, "_params", None)
    infos = getattr(flat, "_param_infos", None)
    padding = getattr(flat, "_is_padding_mask", None)
    if params is None or infos is None or padding is None or not 0 <= index < len(padding) or padding[index]:
        return []
    j = sum(1 for is_padding in padding[:index] if not is_padding)
    return [params[j], getattr(infos[j].module, infos[j].param_name)]


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
    originals: dict[int, Tensor] = {}  # FSDP1: a unit's view of a parameter -> the parameter
    reached = {
        task: reached_leaves(loss, originals) for task, loss in losses.items() if isinstance(loss, Tensor)
    }
    sharing = Sharing(task_specific={task: [] for task in reached})
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        tasks = [task for task, ids in reached.items() if id(p) in ids]
        if len(tasks) >= 2:
            sharing.shared.append((name, originals.get(id(p), p)))  # type: ignore[arg-type]
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
