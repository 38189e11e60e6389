"""Per-task gradients: the gradient engine every gradient-based strategy and diagnostic asks.

This layer knows torch and the Trainer's distributed strategy, and nothing of any multi-task method:

- :mod:`~lightning_mtl.gradients.jacobian`: the Jacobian ``J [T, P]`` of the task losses by one batched
  backward (``vmap`` over the ``T`` rows of the identity) or, where an operation has no batching rule, a loop;
- :mod:`~lightning_mtl.gradients.sources`: what gradients are taken of (``shared_parameters()``, a named
  layer, the marked representation) and under which AMP loss scale;
- :mod:`~lightning_mtl.gradients.window`: :class:`TaskGradients`, the accumulation window, the one cross-rank
  reduction, the heads correction and the one combined backward.

Under 16-bit AMP the backward runs on the losses multiplied by the GradScaler's scale (so fp16 gradients do not
underflow) and the result is divided by it: callers get unscaled gradients, non-finite when the pass overflowed.
"""

from lightning_mtl.functional import gramian
from lightning_mtl.gradients.jacobian import JacobianEngine, JacobianMethod, jacobian, unflatten
from lightning_mtl.gradients.sources import (
    check_trainable,
    grad_scale,
    marked_representation,
    shared_parameters_of,
)
from lightning_mtl.gradients.window import Heads, SyncMode, Target, TaskGradients, nan_weights

__all__ = [
    "Heads",
    "JacobianEngine",
    "JacobianMethod",
    "SyncMode",
    "Target",
    "TaskGradients",
    "check_trainable",
    "grad_scale",
    "gramian",
    "jacobian",
    "marked_representation",
    "nan_weights",
    "shared_parameters_of",
    "unflatten",
]
