"""Every gradient-based method of the functional layer, in one namespace.

Each method takes the task Jacobian ``J`` (``[T, P]``, one row per task) and returns the update
(``[P]``); the methods whose update is a combination ``Jᵀw`` of the rows also expose ``<name>_weights(G)``
on the Gramian ``G = J Jᵀ`` (``[T, T]``), with ``<name>(J) == J.T @ <name>_weights(gramian(J))`` (the float64
weights cast to ``J``'s dtype). :func:`gramian` forms ``G`` in float64 whatever the dtype of ``J``, and
:func:`cosine_similarities` / :func:`cosine_min` read the task gradients' cosines from it.
"""

from __future__ import annotations

from ._gramian import cap_update_norm, cosine_min, cosine_similarities, gramian
from .aligned_mtl import aligned_mtl, aligned_mtl_weights
from .cagrad import cagrad, cagrad_weights
from .dualproj import dualproj, dualproj_weights
from .fairgrad import fairgrad, fairgrad_weights
from .graddrop import graddrop
from .gradvac import GradVacResult, GradVacWeights, gradvac, gradvac_weights
from .imtl_g import imtl_g, imtl_g_weights
from .mgda import mgda, mgda_weights
from .nash_mtl import NashMTLResult, NashMTLWeights, nash_mtl, nash_mtl_weights
from .pcgrad import pcgrad, pcgrad_weights
from .upgrad import upgrad, upgrad_weights

__all__ = [
    "GradVacResult",
    "GradVacWeights",
    "NashMTLResult",
    "NashMTLWeights",
    "aligned_mtl",
    "aligned_mtl_weights",
    "cagrad",
    "cagrad_weights",
    "cap_update_norm",
    "cosine_min",
    "cosine_similarities",
    "dualproj",
    "dualproj_weights",
    "fairgrad",
    "fairgrad_weights",
    "graddrop",
    "gradvac",
    "gradvac_weights",
    "gramian",
    "imtl_g",
    "imtl_g_weights",
    "mgda",
    "mgda_weights",
    "nash_mtl",
    "nash_mtl_weights",
    "pcgrad",
    "pcgrad_weights",
    "upgrad",
    "upgrad_weights",
]
