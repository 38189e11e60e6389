"""Diagnostics callbacks (not strategies): Δm%, gradient conflict, task affinity, end-of-fit summary.

Attach them next to one strategy callback: ``Trainer(callbacks=[PCGrad(), GradientConflictMonitor()])``.
"""

from lightning_mtl.callbacks.delta_m import DeltaM
from lightning_mtl.callbacks.gradient_conflict import GradientConflictMonitor, conflict_statistics
from lightning_mtl.callbacks.summary import MTLSummary
from lightning_mtl.callbacks.task_affinity import TaskAffinity, lookahead_affinity

__all__ = [
    "DeltaM",
    "GradientConflictMonitor",
    "MTLSummary",
    "TaskAffinity",
    "conflict_statistics",
    "lookahead_affinity",
]
