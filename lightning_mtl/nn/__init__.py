"""Multi-task architectures as plain torch modules: hard and soft sharing, experts, attention, task routing.

Each one is a :class:`MultiTaskArchitecture`: ``forward(x)`` returns ``{task: output}``, and it declares which of
its parameters two or more tasks share, so a :class:`~lightning_mtl.MultiTaskModule` that holds one gets
``shared_parameters()`` (and, where the architecture has one, the shared representation of
``mode="representation"``) with no code. :func:`build_architecture` builds any of them by name with defaults
for vector input (what ``lightning-mtl compare --arch`` and ``examples/architectures.py`` use).
"""

from lightning_mtl.nn.base import MultiTaskArchitecture, default_conv_stack, default_mlp
from lightning_mtl.nn.cross_stitch import CrossStitch
from lightning_mtl.nn.dselect_k import DSelectK, DSelectKGate
from lightning_mtl.nn.experts import CGC, PLE, MMoE, gate_entropy
from lightning_mtl.nn.hard_sharing import HardSharing, MultiBackbone
from lightning_mtl.nn.mtan import MTAN
from lightning_mtl.nn.registry import ARCHITECTURES, build_architecture, resolve_architecture
from lightning_mtl.nn.task_routing import TaskRouting

__all__ = [
    "ARCHITECTURES",
    "CGC",
    "MMoE",
    "MTAN",
    "PLE",
    "CrossStitch",
    "DSelectK",
    "DSelectKGate",
    "HardSharing",
    "MultiBackbone",
    "MultiTaskArchitecture",
    "TaskRouting",
    "build_architecture",
    "default_conv_stack",
    "default_mlp",
    "gate_entropy",
    "resolve_architecture",
]
