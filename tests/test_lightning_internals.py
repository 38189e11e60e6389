"""Every private Lightning API the package relies on (all of it in ``lightning_mtl._lightning``), checked against the
installed Lightning on a real Trainer. A failure here names the Lightning version: the internal changed, and the
function in ``_lightning.py`` that uses it must follow."""

from __future__ import annotations

import lightning
import torch
from helpers import TinyNet, loader, make_data, trainer
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_mtl import _lightning

VERSION = f"lightning {lightning.__version__} (lightning_mtl._lightning was written against {_lightning.WRITTEN_AGAINST})"


class Probe(Callback):
    """Reads the internals during training, where the package reads them."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.should_log: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(_lightning.logging_step(trainer))
        self.should_log.append(_lightning.should_update_logs(trainer))


def test_batches_that_stepped_counts_the_training_batches_loggers_write_at():
    probe = Probe()
    t = trainer(max_epochs=2, callbacks=[probe], log_every_n_steps=3)
    loop = t.fit_loop.epoch_loop
    assert hasattr(loop, "_batches_that_stepped"), (
        f"{VERSION}: fit_loop.epoch_loop._batches_that_stepped is gone"
    )
    t.fit(TinyNet(), loader(make_data(n=64)))  # 4 batches an epoch
    assert probe.steps == list(range(8)), (
        f"{VERSION}: _batches_that_stepped no longer counts batches ({probe.steps})"
    )
    assert _lightning.logging_step(t) == 8, VERSION


def test_logger_connector_should_update_logs_follows_log_every_n_steps():
    probe = Probe()
    t = trainer(max_epochs=1, callbacks=[probe], log_every_n_steps=3)
    connector = getattr(t, "_logger_connector", None)
    assert connector is not None and hasattr(type(connector), "should_update_logs"), (
        f"{VERSION}: Trainer._logger_connector.should_update_logs is gone"
    )
    t.fit(TinyNet(), loader(make_data(n=96)))  # 6 batches
    assert probe.should_log == [False, False, True, False, False, True], f"{VERSION}: {probe.should_log}"


def test_logger_connector_callback_metrics_dict_and_log_metrics(tmp_path):
    t = trainer(max_steps=1, logger=CSVLogger(tmp_path))
    model = TinyNet()
    t.fit(model, loader(make_data(n=16)))
    connector = t._logger_connector
    assert isinstance(getattr(connector, "_callback_metrics", None), dict), (
        f"{VERSION}: Trainer._logger_connector._callback_metrics is no longer a dict"
    )
    assert callable(getattr(connector, "log_metrics", None)), (
        f"{VERSION}: _logger_connector.log_metrics is gone"
    )
    # what write_step_metrics relies on: the dict is the one behind trainer.callback_metrics, and log_metrics
    # reaches the loggers and trainer.logged_metrics
    _lightning.write_step_metrics(model, {"probe/value": torch.tensor(3.0)}, to_loggers=True)
    assert float(t.callback_metrics["probe/value"]) == 3.0, (
        f"{VERSION}: _callback_metrics is not callback_metrics"
    )
    assert float(t.logged_metrics["probe/value"]) == 3.0, (
        f"{VERSION}: log_metrics no longer updates logged_metrics"
    )


def test_an_instance_attribute_shadows_log_and_log_dict():
    model = TinyNet()
    t = trainer(max_steps=1)
    t.fit(model, loader(make_data(n=16)))
    with _lightning.silenced_logging(model):
        model.log("probe/silenced", 1.0)
        model.log_dict({"probe/silenced_dict": 1.0})
    assert "log" not in model.__dict__ and "log_dict" not in model.__dict__
    assert type(model).log is lightning.pytorch.LightningModule.log, (
        f"{VERSION}: LightningModule.log moved; check that an instance attribute still shadows it"
    )
    assert "probe/silenced" not in t.callback_metrics and "probe/silenced_dict" not in t.callback_metrics, (
        VERSION
    )
