"""Strategy callbacks: how the task losses become one update. Attach exactly one to the Trainer."""

from lightning_mtl.step import StepContext
from lightning_mtl.strategies._gradient_based import GradientWeighting
from lightning_mtl.strategies._gradient_direction import Direction, GradientDirection
from lightning_mtl.strategies._loss_based import LossWeighting
from lightning_mtl.strategies.aligned_mtl import AlignedMTL
from lightning_mtl.strategies.base import MTLStrategy
from lightning_mtl.strategies.cagrad import CAGrad
from lightning_mtl.strategies.dbmtl import DBMTL
from lightning_mtl.strategies.dtp import DTP
from lightning_mtl.strategies.dwa import DWA
from lightning_mtl.strategies.equal import EqualWeighting
from lightning_mtl.strategies.excess_mtl import ExcessMTL
from lightning_mtl.strategies.fairgrad import FairGrad
from lightning_mtl.strategies.famo import FAMO
from lightning_mtl.strategies.gcs import GCS
from lightning_mtl.strategies.gls import GLS
from lightning_mtl.strategies.graddrop import GradDrop
from lightning_mtl.strategies.gradnorm import GradNorm
from lightning_mtl.strategies.gradvac import GradVac
from lightning_mtl.strategies.hydalearn import HydaLearn
from lightning_mtl.strategies.imtl import IMTL, IMTLL
from lightning_mtl.strategies.imtl_g import IMTLG
from lightning_mtl.strategies.logse import LogSE, ScaleInvariant
from lightning_mtl.strategies.mgda import MGDA
from lightning_mtl.strategies.moco import MoCo
from lightning_mtl.strategies.modo import MoDo
from lightning_mtl.strategies.nash_mtl import NashMTL
from lightning_mtl.strategies.olaux import OLAUX
from lightning_mtl.strategies.pcgrad import PCGrad
from lightning_mtl.strategies.rlw import RLW
from lightning_mtl.strategies.sdmgrad import SDMGrad
from lightning_mtl.strategies.slaw import SLAW
from lightning_mtl.strategies.static import StaticWeighting
from lightning_mtl.strategies.stch import STCH
from lightning_mtl.strategies.uncertainty import UncertaintyWeighting
from lightning_mtl.strategies.upgrad import DualProj, UPGrad

__all__ = [
    "DBMTL",
    "DTP",
    "DWA",
    "FAMO",
    "GCS",
    "GLS",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "RLW",
    "SLAW",
    "SDMGrad",
    "STCH",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "EqualWeighting",
    "ExcessMTL",
    "Direction",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientDirection",
    "GradientWeighting",
    "LogSE",
    "LossWeighting",
    "MTLStrategy",
    "HydaLearn",
    "MoCo",
    "MoDo",
    "NashMTL",
    "OLAUX",
    "PCGrad",
    "ScaleInvariant",
    "StaticWeighting",
    "StepContext",
    "UPGrad",
    "UncertaintyWeighting",
]
