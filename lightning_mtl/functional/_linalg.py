"""Small linear-algebra helpers of the solvers, on ``T×T`` float64 matrices."""

from __future__ import annotations

import torch
from torch import Tensor


def normalize_by_trace(G64: Tensor) -> tuple[Tensor, float]:
    """``(G / tr G, tr G)``; a zero Gramian (all gradients zero) gives ``(0, 0.0)``.

    The solvers work on ``G / tr G``, so that every tolerance and ridge they use is relative to the scale
    of the gradients: a method's weights then do not change when every loss is multiplied by a constant.
    """
    trace = float(G64.diagonal().sum())
    if not trace > 0.0:
        return torch.zeros_like(G64), 0.0
    return G64 / trace, trace


def psd_part(G64: Tensor) -> Tensor:
    """Nearest positive semi-definite matrix: negative eigenvalues set to zero.

    A Gramian computed in float32 is indefinite at the level of its rounding (eigenvalues down to about
    ``−1e-7·tr G``), enough to make the small convex problems of MGDA, CAGrad, Nash-MTL, FairGrad (and,
    in half precision, UPGrad) non-convex; this removes that noise and nothing else.
    """
    eigenvalues, V = torch.linalg.eigh(G64)
    if bool((eigenvalues >= 0).all()):
        return G64
    G_psd = (V * eigenvalues.clamp_min(0)) @ V.T
    return (G_psd + G_psd.T) / 2
