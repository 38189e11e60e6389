"""LR schedulers however they are supplied (issue 7, item 14): a subclass method, a function set on the instance,
and LightningCLI's ``optimizer:`` / ``lr_scheduler:`` config (which installs ``configure_optimizers`` on the
instance, bypassing the class-level wrapper)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import yaml
from helpers import ScalarNet, dummy_loader, trainer

from lightning_mtl import MultiTaskModule


def _config(tmp_path, lr_scheduler: dict) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 3,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "class_path": "lightning_mtl.datasets.MLPMultiTask",
            "init_args": {"dataset": "synthetic", "hidden": 8, "depth": 1},
        },
        "data": {
            "class_path": "lightning_mtl.datasets.BuiltinDataModule",
            "init_args": {"dataset": "synthetic", "batch_size": 32},
        },
        # lr 1e-9: val/loss does not improve, so a plateau scheduler with patience 0 halves the lr every epoch
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1e-9}},
        "lr_scheduler": lr_scheduler,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _lightning_cli(args: list[str]):
    from lightning.pytorch.cli import LightningCLI

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
        return LightningCLI(
            MultiTaskModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_callback=None,
        )


@pytest.mark.timeout(300)
def test_lightning_cli_reduce_on_plateau_monitoring_val_loss(tmp_path):
    path = _config(
        tmp_path,
        {
            "class_path": "lightning.pytorch.cli.ReduceLROnPlateau",
            "init_args": {"monitor": "val/loss", "patience": 0, "factor": 0.5, "eps": 1e-12},
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # Lightning's "keys will be ignored" warning
        cli = _lightning_cli(["fit", "--config", path])
    # epoch 1 sets the best value, epochs 2 and 3 do not improve on it: two halvings
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2.5e-10)


@pytest.mark.timeout(300)
def test_lightning_cli_step_scheduler(tmp_path):
    path = _config(
        tmp_path,
        {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.1}},
    )
    cli = _lightning_cli(["fit", "--config", path])
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-12)  # stepped after each epoch


def test_a_configure_optimizers_set_on_the_instance_keeps_its_monitor():
    net = ScalarNet(lr=0.0)

    def configure_optimizers():
        opt = torch.optim.SGD(net.parameters(), lr=1e-6)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "monitor": "val/loss", "interval": "epoch"},
        }

    net.configure_optimizers = configure_optimizers
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer(max_epochs=3).fit(net, dummy_loader(1), dummy_loader(1))
    assert net.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2.5e-7)


def test_an_unknown_interval_is_an_error_naming_the_scheduler():
    class Scheduled(ScalarNet):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "batch"}}

    with pytest.raises(ValueError, match=r"StepLR: interval must be 'step' or 'epoch', got 'batch'"):
        trainer(max_steps=1).fit(Scheduled(), dummy_loader(1))
