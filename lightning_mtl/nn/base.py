"""The contract every architecture of :mod:`lightning_mtl.nn` keeps, so that a :class:`~lightning_mtl.MultiTaskModule`
holding one gets ``shared_parameters()`` and the representation of ``mode="representation"`` from it.

Architectures are plain torch modules (no Lightning inside): ``forward(x)`` returns ``{task: output}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from torch import Tensor, nn

__all__ = ["MultiTaskArchitecture", "check_task_names", "default_conv_stack", "default_mlp"]

Marker = Callable[[Tensor], Tensor]


def check_task_names(owner: str, tasks: Sequence[str]) -> tuple[str, ...]:
    """The task names as a tuple: non-empty, strings, unique (a clear error otherwise)."""
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise ValueError(f"{owner} tasks must be a non-empty sequence of task names, got {tasks!r}.")
    names = tuple(tasks)
    bad = [t for t in names if not isinstance(t, str) or not t]
    if bad:
        raise ValueError(f"{owner} task names must be non-empty strings, got {bad!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"{owner} task names must be unique, got {list(names)!r}.")
    return names


class MultiTaskArchitecture(nn.Module):
    """Base of the multi-task architectures.

    Subclasses build their modules in ``__init__`` (after ``super().__init__(tasks)``) and implement
    :meth:`forward` and :meth:`shared_modules` (or override :meth:`shared_parameters`); the task-specific
    parameters are the others (:meth:`task_parameters`).

    **The shared representation.** When the architecture has one tensor that every task head consumes (hard
    sharing's trunk output at the lowest branch point, the concatenated features of several backbones), its
    ``forward`` passes it through :meth:`mark` — the identity unless a :class:`~lightning_mtl.MultiTaskModule`
    installed its ``shared_representation`` marker (it does so for the architecture it holds), so the gradient
    strategies' ``mode="representation"`` works with no user code. Architectures whose tasks read different
    tensors (cross-stitch columns, expert mixtures, attention-masked features, routed channels) set
    :attr:`representation_unsupported` to the reason, and ``mode="representation"`` is refused with it.

    Args:
        tasks: the task names (the keys of :meth:`forward`'s output), in order.
    """

    #: ``None`` when :meth:`forward` marks one shared representation; else why it has none (shown in errors)
    representation_unsupported: str | None = None

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.task_names: tuple[str, ...] = check_task_names(type(self).__name__, tasks)
        self._marker: Marker | None = None

    # ------------------------------------------------------------------ what is shared
    def shared_modules(self) -> list[nn.Module]:
        """The modules whose parameters two or more tasks' outputs depend on."""
        raise NotImplementedError(f"{type(self).__name__} must implement shared_modules().")

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters two or more tasks' outputs depend on (each once, in module order)."""
        seen: set[int] = set()
        for module in self.shared_modules():
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that are not shared (heads, task-specific columns, gates, towers)."""
        shared = {id(p) for p in self.shared_parameters()}
        return (p for p in self.parameters() if id(p) not in shared)

    # ------------------------------------------------------------------ the representation
    def set_representation_marker(self, marker: Marker | None) -> None:
        """Install (or remove, with ``None``) the function :meth:`mark` applies to the shared representation."""
        self._marker = marker

    def mark(self, z: Tensor) -> Tensor:
        """The shared representation ``z`` passed through the installed marker (the identity without one)."""
        return z if self._marker is None else self._marker(z)

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def default_mlp(
    in_features: int, hidden: Sequence[int], *, activation: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """A simple MLP ``in_features → hidden[0] → … → hidden[-1]`` with an activation after every layer (the default
    trunk / expert for vector input)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    return nn.Sequential(*layers)


def default_conv_stack(in_channels: int, channels: Sequence[int]) -> nn.Sequential:
    """A small conv stack for images: per entry a 3×3 conv, BatchNorm, ReLU and 2× max-pool."""
    layers: list[nn.Module] = []
    width = in_channels
    for c in channels:
        layers += [nn.Conv2d(width, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        width = c
    return nn.Sequential(*layers)
