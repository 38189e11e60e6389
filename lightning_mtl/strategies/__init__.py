"""Strategy callbacks: how the task losses become one update. Attach exactly one to the Trainer."""

from lightning_mtl.strategies._loss_based import LossWeighting
from lightning_mtl.strategies.base import MTLStrategy, StepContext
from lightning_mtl.strategies.dwa import DWA
from lightning_mtl.strategies.equal import EqualWeighting
from lightning_mtl.strategies.gls import GLS
from lightning_mtl.strategies.gradnorm import GradNorm
from lightning_mtl.strategies.rlw import RLW
from lightning_mtl.strategies.static import StaticWeighting
from lightning_mtl.strategies.uncertainty import UncertaintyWeighting

__all__ = [
    "DWA",
    "GLS",
    "GradNorm",
    "RLW",
    "EqualWeighting",
    "LossWeighting",
    "MTLStrategy",
    "StaticWeighting",
    "StepContext",
    "UncertaintyWeighting",
]
