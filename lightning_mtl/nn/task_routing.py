"""Task Routing: one network for many tasks, each task using a fixed random subset of every routed layer's units."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_mtl.nn.base import MultiTaskArchitecture
from lightning_mtl.nn.hard_sharing import (
    HeadsSpec,
    ModuleSpec,
    build_heads,
    build_module,
    check_widths,
    default_stages,
    user_stages,
)

__all__ = ["TaskRouting", "routing_masks"]


def routing_masks(num_tasks: int, units: int, active: int, generator: torch.Generator) -> Tensor:
    """A ``(num_tasks, units)`` 0/1 mask with ``active`` ones per row at random positions, drawn independently per
    task from ``generator``."""
    mask = torch.zeros(num_tasks, units)
    for t in range(num_tasks):
        mask[t, torch.randperm(units, generator=generator)[:active]] = 1.0
    return mask


class TaskRouting(MultiTaskArchitecture):
    """Task Routing: every routed layer multiplies its output by a fixed random binary channel mask of the active
    task, so each task uses its own subset of the shared units — built for many (tens to hundreds of) tasks.

    Strezoski, van Noord, Worring, "Many Task Learning with Task Routing", ICCV 2019. A Task Routing Layer (TRL)
    follows every routed layer; its mask ``M ∈ {0,1}^{T×C}`` is drawn once at construction, independently per layer,
    and never trained; ``y = x ⊙ M_t`` broadcast over the spatial positions. Here a TRL follows every stage (its
    output channels, dim 1). The official VGG places it after each conv's BatchNorm and before its ReLU; for the
    default stages (conv, BN, ReLU, max-pool per stage; Linear, ReLU) masking the stage output is the same
    function, because ReLU and max-pooling commute with a per-channel 0/1 mask.

    **σ.** ``sharing_ratio`` σ is the fraction of each layer's units kept active per task: a task keeps
    ``⌊σC⌋`` of ``C`` units (at least 1 required) and the other ``C − ⌊σC⌋`` are zeroed. The official code
    (gstrezoski/TaskRouting, ``routed_vgg.py`` / ``taskrouting.py``) uses σ the other way round: ``vgg11(sigma=0.5)``
    builds each router with ``int(C · sigma)`` *knocked-out* units per task (σ = 0: no routing); pass
    ``masked_fraction=`` for exactly that rule (``C − ⌊mC⌋`` units kept). At 0.5 (the default of both, the paper's
    "50% shared") the two coincide for even C. Pass at most one of the two.

    **Masks** are registered buffers (``mask_0``, ``mask_1``, …; saved in the ``state_dict``), drawn from a
    ``torch.Generator`` seeded with ``seed``, so they are the same across forwards, reloads and ranks, and never
    get a gradient; the multiply is out of place (the official code draws M with an unseeded ``np.random``, keeps it
    as an ``nn.Parameter`` and multiplies ``input.data`` in place, so autograd never sees the mask and only the
    following ReLU stops the gradient of masked units). Different tasks' masks differ with high probability only
    (they are not forced to).

    **Forward.** The official code activates one task per forward and runs only its head. ``forward(x)`` runs
    every task (the masked pass of the trunk and the task's head, once per task: T× the trunk's cost);
    ``forward(x, tasks=[...])`` runs only those tasks, for training on a sampled subset of hundreds of tasks (under
    DDP the unused heads then need ``find_unused_parameters=True``).

    **Shared.** The stages (each task updates the units it keeps; every stage tensor is reached by every task at
    σ > 0); the heads are task-specific; the masks are buffers. Each task reads its own masked features, so
    ``mode="representation"`` is refused (:attr:`representation_unsupported`).

    Args:
        tasks: task names, in order.
        stages: the routed stages, as modules or factories (``None``: the defaults from ``in_features`` /
            ``in_channels``, as :class:`HardSharing`).
        heads: ``{task: module or factory}`` or a factory called with the task name; ``None``: a linear head per
            task (the official heads are one linear layer per binary attribute).
        widths: the default stages' widths, or (required) the user's stages' output channels: the mask sizes.
        in_features, in_channels: vector / image input for the default stages.
        out_features: the default heads' output size (one int, or ``{task: int}``).
        sharing_ratio: σ, the fraction of units kept active per task, in (0, 1] (default 0.5).
        masked_fraction: the official σ, the fraction of units zeroed per task, in [0, 1); instead of
            ``sharing_ratio``.
        seed: the mask generator's seed (default 0).

    Example::

        arch = TaskRouting([f"attr{i}" for i in range(40)], in_channels=3, widths=(32, 64), sharing_ratio=0.5)
        out = arch(x, tasks=["attr3", "attr17"])  # only those two tasks
    """

    representation_unsupported = (
        "each task-routing task head reads the trunk's output under its own channel masks; no single tensor "
        "feeds every task."
    )

    def __init__(
        self,
        tasks: Sequence[str],
        stages: Sequence[ModuleSpec] | None = None,
        heads: HeadsSpec = None,
        *,
        widths: Sequence[int] | None = None,
        in_features: int | None = None,
        in_channels: int | None = None,
        out_features: int | Mapping[str, int] = 1,
        sharing_ratio: float | None = None,
        masked_fraction: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks)
        owner = type(self).__name__
        if sharing_ratio is not None and masked_fraction is not None:
            raise ValueError(
                f"{owner}: pass sharing_ratio (fraction kept) or masked_fraction (fraction zeroed), not both; got "
                f"sharing_ratio={sharing_ratio!r}, masked_fraction={masked_fraction!r}."
            )
        if masked_fraction is not None:
            if not _number(masked_fraction) or not 0.0 <= masked_fraction < 1.0:
                raise ValueError(
                    f"{owner} masked_fraction must be a number in [0, 1), got {masked_fraction!r}."
                )
        else:
            sharing_ratio = 0.5 if sharing_ratio is None else sharing_ratio
            if not _number(sharing_ratio) or not 0.0 < sharing_ratio <= 1.0:
                raise ValueError(
                    f"{owner} sharing_ratio (the fraction of units kept per task) must be a number in (0, 1], got "
                    f"{sharing_ratio!r}."
                )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{owner} seed must be an int, got {seed!r}.")
        if stages is None:
            built, ws = default_stages(owner, in_features, in_channels, widths)
        else:
            specs = user_stages(owner, "stages", stages)
            built = [build_module(owner, f"stages[{i}]", s) for i, s in enumerate(specs)]
            given = check_widths(owner, widths)
            if given is None or len(given) != len(built):
                raise ValueError(
                    f"{owner} needs widths=[...] with the user's stages: each stage's output channels (the mask "
                    f"sizes), one per stage ({len(built)}); got {widths!r}."
                )
            ws = given
        self.stages = nn.ModuleList(built)
        self.masked_fraction = masked_fraction
        self.sharing_ratio = (
            sharing_ratio if masked_fraction is None else 1.0 - masked_fraction
        )  # nominal σ (kept fraction)
        #: units kept active per task, per routed stage
        self.active_units: list[int] = []
        for i, c in enumerate(ws):
            if masked_fraction is not None:
                active = c - int(math.floor(masked_fraction * c + 1e-9))
            else:
                active = int(math.floor(sharing_ratio * c + 1e-9))  # type: ignore[operator]
            if active < 1:
                raise ValueError(
                    f"{owner}: sharing_ratio={self.sharing_ratio!r} keeps no unit of stage {i} ({c} units); raise "
                    "sharing_ratio or widen the stage."
                )
            self.active_units.append(active)
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        for i, (c, active) in enumerate(zip(ws, self.active_units, strict=True)):
            self.register_buffer(f"mask_{i}", routing_masks(len(self.task_names), c, active, generator))
        self.heads = build_heads(
            owner, self.task_names, heads, dict.fromkeys(self.task_names, ws[-1]), out_features
        )
        self._index = {t: i for i, t in enumerate(self.task_names)}

    def shared_modules(self) -> list[nn.Module]:
        return [self.stages]

    def masks(self) -> list[Tensor]:
        """The routing masks, one ``(T, C)`` 0/1 buffer per routed stage (row ``t``: task ``t``)."""
        return [getattr(self, f"mask_{i}") for i in range(len(self.stages))]

    def routed_features(self, x: Tensor, task: str) -> Tensor:
        """The trunk's output for ``task``: every stage's output multiplied by the task's mask."""
        t = self._index[task]
        h = x
        for stage, mask in zip(self.stages, self.masks(), strict=True):
            h = stage(h)
            if h.dim() < 2 or h.shape[1] != mask.shape[1]:
                raise ValueError(
                    f"{type(self).__name__}: a stage returned shape {tuple(h.shape)}, but its mask has "
                    f"{mask.shape[1]} units (dim 1); fix widths=[...]."
                )
            h = h * mask[t].to(h.dtype).view(-1, *([1] * (h.dim() - 2)))
        return h

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``{task: output}`` for every task, or only for ``tasks`` (in the order of :attr:`task_names`)."""
        if tasks is None:
            chosen = self.task_names
        else:
            if isinstance(tasks, str):
                tasks = [tasks]
            unknown = [t for t in tasks if t not in self._index]
            if unknown:
                raise ValueError(
                    f"{type(self).__name__} forward(tasks=...) names unknown tasks {unknown!r}; "
                    f"tasks are {list(self.task_names)[:10]!r}{'…' if len(self.task_names) > 10 else ''}."
                )
            wanted = set(tasks)
            chosen = tuple(t for t in self.task_names if t in wanted)
        return {t: self.heads[t](self.routed_features(x, t)) for t in chosen}


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))
