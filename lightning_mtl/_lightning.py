"""Every use of Lightning's private API, in one place.

Written against lightning 2.6.6. Each function names the internal it relies on; ``tests/test_lightning_internals.py``
checks every one of them against the installed Lightning and fails naming its version when one changes. Where a
public fallback exists (slower, or with a warning) the function takes it rather than crash.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from torch import Tensor

#: the Lightning version this module was written against (the tests name the installed one when they fail)
WRITTEN_AGAINST = "2.6.6"
INSTALLED = lightning.__version__

__all__ = ["logging_step", "should_update_logs", "silenced_logging", "write_step_metrics"]


def logging_step(trainer: pl.Trainer) -> int:
    """The step at which Lightning writes training logs: ``fit_loop.epoch_loop._batches_that_stepped`` (the
    number of batches that ended an optimizer step, which ``log_every_n_steps`` counts)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def should_update_logs(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes training logs at this step: ``_logger_connector.should_update_logs`` (it follows
    ``log_every_n_steps``). ``True`` if the connector is gone (write every step rather than never)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def write_step_metrics(module: pl.LightningModule, metrics: dict[str, Tensor], to_loggers: bool) -> None:
    """Put per-step values in ``trainer.callback_metrics`` (every step, as ``self.log(on_step=True)`` would)
    and, when ``to_loggers``, write them to the Trainer's loggers at the step Lightning uses for its own
    training logs (also updating ``trainer.logged_metrics``).

    Internals: ``_logger_connector._callback_metrics`` (the dict behind ``trainer.callback_metrics``) and
    ``_logger_connector.log_metrics``. ``self.log`` costs ~0.3 ms per key (Lightning's result collection), i.e.
    ~6 ms per step for ``2T + 1`` keys at T = 10; this path costs a dict update, plus one host transfer on
    logging steps. If the internals are gone, logging steps fall back to ``module.log_dict``.
    """
    trainer = module.trainer
    connector = getattr(trainer, "_logger_connector", None)
    callback_metrics = getattr(connector, "_callback_metrics", None)
    if connector is None or not hasattr(connector, "log_metrics") or not isinstance(callback_metrics, dict):
        if to_loggers:
            module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        return
    detached = {k: v.detach() for k, v in metrics.items()}
    callback_metrics.update(detached)
    if to_loggers and trainer.loggers:
        values = torch.stack([v.reshape(()).float() for v in detached.values()]).tolist()  # one sync
        connector.log_metrics(dict(zip(detached, values)))


@contextmanager
def silenced_logging(module: pl.LightningModule) -> Iterator[None]:
    """Make ``module.log`` / ``module.log_dict`` no-ops inside the block, by shadowing the methods with instance
    attributes (Lightning has no public switch). Used by look-ahead forwards whose ``task_losses`` may log."""

    def no_op(*args: Any, **kwargs: Any) -> None:
        return None

    module.__dict__["log"] = no_op
    module.__dict__["log_dict"] = no_op
    try:
        yield
    finally:
        module.__dict__.pop("log", None)
        module.__dict__.pop("log_dict", None)
