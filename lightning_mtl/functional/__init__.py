"""Pure math of every method: torch only, no Lightning, no state, no I/O.

Loss-weighting rules take the losses ``[T]``; gradient methods take the task Jacobian ``J`` (``[T, P]``) and
return the update ``[P]``, and the Gramian-expressible ones also expose ``<name>_weights(G)`` on ``G = J Jᵀ``.
:func:`gramian` forms ``G`` (float64, whatever the dtype of ``J``); :func:`cosine_similarities` and
:func:`cosine_min` read the task gradients' cosines from it.
"""

from lightning_mtl.functional.dbmtl import DBMTLResult, DBMTLState, dbmtl_step, log_loss_jacobian
from lightning_mtl.functional.dtp import (
    DTP_EPS,
    dtp_ema,
    dtp_focal_weight,
    dtp_loss,
    dtp_weights,
    focal_weight_bound,
)
from lightning_mtl.functional.excess_mtl import ExcessMTLResult, ExcessMTLState, excess_mtl_step, excess_risks
from lightning_mtl.functional.famo import (
    famo_effective_weights,
    famo_logits_grad,
    famo_objective,
    famo_weights,
)
from lightning_mtl.functional.gradient_methods import *  # noqa: F403
from lightning_mtl.functional.gradient_methods import __all__ as _gradient_all
from lightning_mtl.functional.gradnorm import (
    gradnorm_objective,
    gradnorm_targets,
    gradnorm_weight_grad,
    inverse_training_rates,
    renormalize_weights,
)
from lightning_mtl.functional.log_losses import (
    logse_loss,
    logse_weights,
    scale_invariant_loss,
    scale_invariant_weights,
    uncertainty_optimal_log_variances,
)
from lightning_mtl.functional.loss_weighting import (
    dwa_weights,
    gls_loss,
    gls_weights,
    imtl_l_grad,
    imtl_l_objective,
    random_weights,
    static_weights,
    uncertainty_objective,
    uncertainty_objective_grad,
    uncertainty_weights,
)
from lightning_mtl.functional.moco import (
    MoCoResult,
    MoCoState,
    loss_norm_gradients,
    moco_step,
    project_simplex,
)
from lightning_mtl.functional.modo import (
    cross_gramian,
    modo_direction,
    modo_step,
    modo_weights,
    project_onto_simplex,
)
from lightning_mtl.functional.sdmgrad import (
    sdmgrad_coefficients,
    sdmgrad_direction,
    sdmgrad_step,
    sdmgrad_weights,
)
from lightning_mtl.functional.slaw_stch import (
    cap_weights,
    log_loss,
    log_loss_weights,
    slaw_update,
    slaw_weights,
    stch_loss,
    stch_weights,
)

__all__ = [
    *_gradient_all,
    "DTP_EPS",
    "DBMTLResult",
    "DBMTLState",
    "ExcessMTLResult",
    "ExcessMTLState",
    "MoCoResult",
    "MoCoState",
    "cross_gramian",
    "dbmtl_step",
    "dtp_ema",
    "dtp_focal_weight",
    "dtp_loss",
    "dtp_weights",
    "focal_weight_bound",
    "modo_direction",
    "modo_step",
    "modo_weights",
    "project_onto_simplex",
    "sdmgrad_coefficients",
    "sdmgrad_direction",
    "sdmgrad_step",
    "sdmgrad_weights",
    "excess_mtl_step",
    "excess_risks",
    "log_loss_jacobian",
    "logse_loss",
    "logse_weights",
    "loss_norm_gradients",
    "moco_step",
    "project_simplex",
    "scale_invariant_loss",
    "scale_invariant_weights",
    "uncertainty_optimal_log_variances",
    "dwa_weights",
    "famo_effective_weights",
    "famo_logits_grad",
    "famo_objective",
    "famo_weights",
    "gls_loss",
    "gls_weights",
    "cap_weights",
    "log_loss",
    "log_loss_weights",
    "slaw_update",
    "slaw_weights",
    "stch_loss",
    "stch_weights",
    "gradnorm_objective",
    "gradnorm_targets",
    "gradnorm_weight_grad",
    "imtl_l_grad",
    "imtl_l_objective",
    "inverse_training_rates",
    "random_weights",
    "renormalize_weights",
    "static_weights",
    "uncertainty_objective",
    "uncertainty_objective_grad",
    "uncertainty_weights",
]
