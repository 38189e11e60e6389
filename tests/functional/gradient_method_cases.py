"""Every gradient method of the functional layer, described once for the shared property tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_mtl.functional import gradient_methods as gm


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Method:
    name: str
    update: Callable[[Tensor], Tensor]
    """``J [T, P] -> update [P]`` (random methods use a fixed seed, so the call is repeatable)."""
    weights: Callable[..., Tensor] | None = None
    """``G [T, T] -> weights [T]``, for the methods whose update is ``Jᵀw``."""
    random: bool = False
    degree: float | None = 1.0
    """``update(cJ) = c^degree · update(J)`` for ``c > 0`` (``None``: no such law)."""
    non_conflicting: bool = False
    """``gᵢ·update ≥ 0`` for every task (up to the method's regularisation)."""
    weights_sum: float | None = None
    precision_aware: bool = False
    """``weights`` takes ``eps``: the update of ``J`` passes ``torch.finfo(J.dtype).eps`` (IMTL-G, Aligned-MTL)."""

    def weights_of(self, J: Tensor) -> Tensor:
        """The float64 weights that ``update(J)`` combines the rows of ``J`` with."""
        assert self.weights is not None
        if self.precision_aware:
            return self.weights(gm.gramian(J), eps=torch.finfo(J.dtype).eps)
        return self.weights(gm.gramian(J))


def _graddrop(J: Tensor) -> Tensor:
    # Rows of J as representation gradients of a batch of one with positive activations: S = J.
    return gm.graddrop(J[:, None, :], torch.ones(1, J.shape[1], dtype=J.dtype), generator=seeded())[0]


METHODS = [
    Method(
        "pcgrad",
        lambda J: gm.pcgrad(J, generator=seeded()),
        lambda G: gm.pcgrad_weights(G, generator=seeded()),
        random=True,
    ),
    Method("mgda", gm.mgda, gm.mgda_weights, non_conflicting=True, weights_sum=1.0),
    Method("cagrad", gm.cagrad, gm.cagrad_weights),
    Method("imtl_g", gm.imtl_g, gm.imtl_g_weights, precision_aware=True),
    Method(
        "gradvac",
        lambda J: gm.gradvac(J, generator=seeded()).update,
        lambda G: gm.gradvac_weights(G, generator=seeded()).weights,
        random=True,
    ),
    Method("graddrop", _graddrop, random=True),
    Method("aligned_mtl", gm.aligned_mtl, gm.aligned_mtl_weights, precision_aware=True),
    Method(
        "nash_mtl",
        lambda J: gm.nash_mtl(J).update,
        lambda G: gm.nash_mtl_weights(G).weights,
        degree=0.0,
    ),
    Method("upgrad", gm.upgrad, gm.upgrad_weights, non_conflicting=True),
    Method("dualproj", gm.dualproj, gm.dualproj_weights, non_conflicting=True),
    Method("fairgrad", gm.fairgrad, gm.fairgrad_weights, degree=0.0),
    Method(
        "fairgrad_alpha2",
        lambda J: gm.fairgrad(J, alpha=2.0),
        lambda G: gm.fairgrad_weights(G, alpha=2.0),
        degree=(1 - 2.0) / (1 + 2.0),
    ),
]

WEIGHTED = [m for m in METHODS if m.weights is not None]
DETERMINISTIC = [m for m in WEIGHTED if not m.random]
