"""Regularisers: terms added to the objective next to the one strategy (any number of them).

See :mod:`lightning_mtl.regularizers.base` for the protocol.
"""

from lightning_mtl.regularizers.base import MTLRegularizer, collect_terms, regularizers_of
from lightning_mtl.regularizers.orthogonal import (
    OrthogonalGradients,
    gradient_cosines,
    orthogonality_penalty,
    task_gramian,
)

__all__ = [
    "MTLRegularizer",
    "OrthogonalGradients",
    "collect_terms",
    "gradient_cosines",
    "orthogonality_penalty",
    "regularizers_of",
    "task_gramian",
]
