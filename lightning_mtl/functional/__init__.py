"""Pure math of every method: torch only, no Lightning, no state, no I/O."""

from lightning_mtl.functional.loss_weighting import (
    dwa_weights,
    gls_loss,
    gls_weights,
    random_weights,
    static_weights,
    uncertainty_objective,
    uncertainty_objective_grad,
    uncertainty_weights,
)

__all__ = [
    "dwa_weights",
    "gls_loss",
    "gls_weights",
    "random_weights",
    "static_weights",
    "uncertainty_objective",
    "uncertainty_objective_grad",
    "uncertainty_weights",
]
