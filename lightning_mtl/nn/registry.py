"""The architectures by name, built with defaults for vector input: what ``lightning-mtl compare --arch`` and
``examples/architectures.py`` use."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from lightning_mtl.nn.base import MultiTaskArchitecture

__all__ = ["ARCHITECTURES", "build_architecture", "resolve_architecture"]

Builder = Callable[[Sequence[str], int, Mapping[str, int], int], MultiTaskArchitecture]


def _hard_sharing(tasks: Sequence[str], d: int, out: Mapping[str, int], hidden: int) -> MultiTaskArchitecture:
    from lightning_mtl.nn.hard_sharing import HardSharing

    return HardSharing(tasks, in_features=d, widths=(hidden, hidden), out_features=out)


def _multi_backbone(
    tasks: Sequence[str], d: int, out: Mapping[str, int], hidden: int
) -> MultiTaskArchitecture:
    from lightning_mtl.nn.hard_sharing import MultiBackbone

    return MultiBackbone(
        tasks, in_features=d, widths=(hidden, hidden // 2), num_backbones=2, out_features=out
    )


def _cross_stitch(tasks: Sequence[str], d: int, out: Mapping[str, int], hidden: int) -> MultiTaskArchitecture:
    from lightning_mtl.nn.cross_stitch import CrossStitch

    return CrossStitch(tasks, in_features=d, widths=(hidden, hidden), out_features=out)


def _mtan(tasks: Sequence[str], d: int, out: Mapping[str, int], hidden: int) -> MultiTaskArchitecture:
    from lightning_mtl.nn.mtan import MTAN

    return MTAN(tasks, in_features=d, widths=(hidden, hidden), out_features=out)


def _task_routing(tasks: Sequence[str], d: int, out: Mapping[str, int], hidden: int) -> MultiTaskArchitecture:
    from lightning_mtl.nn.task_routing import TaskRouting

    return TaskRouting(tasks, in_features=d, widths=(hidden, hidden), out_features=out, sharing_ratio=0.5)


def _mmoe(tasks: Sequence[str], d: int, out: Mapping[str, int], hidden: int) -> MultiTaskArchitecture:
    from lightning_mtl.nn.experts import MMoE

    return MMoE(tasks, d, num_experts=8, expert_hidden=(hidden,), out_features=out)


def _cgc(tasks: Sequence[str], d: int, out: Mapping[str, int], hidden: int) -> MultiTaskArchitecture:
    from lightning_mtl.nn.experts import CGC

    return CGC(tasks, d, num_task_experts=1, num_shared_experts=2, expert_hidden=(hidden,), out_features=out)


def _ple(tasks: Sequence[str], d: int, out: Mapping[str, int], hidden: int) -> MultiTaskArchitecture:
    from lightning_mtl.nn.experts import PLE

    return PLE(
        tasks,
        d,
        num_levels=2,
        num_task_experts=1,
        num_shared_experts=2,
        expert_hidden=(hidden,),
        out_features=out,
    )


def _dselect_k(tasks: Sequence[str], d: int, out: Mapping[str, int], hidden: int) -> MultiTaskArchitecture:
    from lightning_mtl.nn.dselect_k import DSelectK

    return DSelectK(tasks, d, k=2, num_experts=8, expert_hidden=(hidden,), out_features=out)


#: name → builder ``(tasks, in_features, {task: out_features}, hidden) -> architecture``
ARCHITECTURES: dict[str, Builder] = {
    "HardSharing": _hard_sharing,
    "CrossStitch": _cross_stitch,
    "MTAN": _mtan,
    "MMoE": _mmoe,
    "CGC": _cgc,
    "PLE": _ple,
    "DSelectK": _dselect_k,
    "TaskRouting": _task_routing,
    "MultiBackbone": _multi_backbone,
}


def resolve_architecture(name: str) -> str:
    """The canonical name of an architecture: case-insensitive, ``-``/``_`` ignored (``hard-sharing``, ``mmoe``)."""
    key = name.replace("-", "").replace("_", "").lower()
    for canonical in ARCHITECTURES:
        if canonical.lower() == key:
            return canonical
    raise ValueError(f"Unknown architecture {name!r}; available: {', '.join(ARCHITECTURES)}.")


def build_architecture(
    name: str, tasks: Sequence[str], in_features: int, out_features: Mapping[str, int], hidden: int = 64
) -> MultiTaskArchitecture:
    """Architecture ``name`` for vector input of ``in_features``, one output of ``out_features[task]`` per task,
    hidden width ``hidden`` (two stages for the layered ones, 8 experts of one hidden layer for MMoE/DSelectK with
    k = 2, one expert per task and two shared for CGC/PLE with two levels for PLE)."""
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 2:
        raise ValueError(f"build_architecture: hidden must be an int >= 2, got {hidden!r}.")
    return ARCHITECTURES[resolve_architecture(name)](tasks, in_features, dict(out_features), hidden)
