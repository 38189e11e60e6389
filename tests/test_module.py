"""MultiTaskModule's optimisation loop and logging."""

from __future__ import annotations

import csv
import glob

import pytest
import torch
from helpers import ScalarNet, TinyNet, dummy_loader, flat_params, loader, make_data, trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision

from lightning_mtl.strategies import UncertaintyWeighting


def test_accumulation_equals_a_twice_larger_batch():
    data = make_data(n=64)
    big = TinyNet()
    trainer(max_epochs=2).fit(big, loader(data, batch_size=16))
    acc = TinyNet(accumulate_grad_batches=2)
    t = trainer(max_epochs=2)
    t.fit(acc, loader(data, batch_size=8))
    torch.testing.assert_close(flat_params(acc), flat_params(big), atol=1e-6, rtol=1e-5)
    assert t.global_step == big.trainer.global_step == 8


def test_accumulation_steps_on_the_last_partial_window():
    net = ScalarNet(accumulate_grad_batches=2)
    t = trainer(max_epochs=1)
    t.fit(net, dummy_loader(3))  # windows: [0, 1], [2]
    assert t.global_step == 2


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping(algorithm):
    # θ=1: ∇ = 2 - 8 = -6; clipped to 0.5 by norm or by value; θ1 = 1 + 0.1*0.5
    net = ScalarNet(gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
    trainer(max_steps=1).fit(net, dummy_loader(1))
    assert net.theta.item() == pytest.approx(1.05)


def test_clipping_sees_unscaled_gradients_under_fp16_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    net = ScalarNet(gradient_clip_val=0.5)
    t = trainer(max_steps=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    t.fit(net, dummy_loader(1))
    # clipped to norm 0.5 of the *unscaled* gradient (clipping scaled gradients would give 0.5/1024)
    assert net.theta.item() == pytest.approx(1.05, rel=1e-3)


def test_lr_scheduler_step_interval_and_frequency():
    class Scheduled(ScalarNet):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2},
            }

    net = Scheduled()
    trainer(max_steps=4).fit(net, dummy_loader(4))
    assert net.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.25)


def test_lr_scheduler_epoch_interval():
    class Scheduled(ScalarNet):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)]

    net = Scheduled(lr=0.0)
    trainer(max_epochs=3).fit(net, dummy_loader(2))
    assert net.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)


def test_reduce_on_plateau_monitors_validation_loss():
    class Plateau(ScalarNet):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1e-6)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss"}}

    net = Plateau()
    trainer(max_epochs=3).fit(net, dummy_loader(1), dummy_loader(1))
    # θ barely moves: val/loss plateaus from the second epoch on, halving the lr twice
    assert net.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2.5e-7)
    net2 = Plateau()
    with pytest.raises(KeyError, match="ReduceLROnPlateau monitors 'val/loss', which was not logged"):
        trainer(max_epochs=1).fit(net2, dummy_loader(1))


def test_several_param_groups_and_optimizers():
    class TwoOpts(TinyNet):
        def configure_optimizers(self):
            enc = torch.optim.SGD(
                [{"params": self.encoder[0].weight, "lr": 0.01}, {"params": self.encoder[0].bias, "lr": 0.0}],
                lr=0.1,
            )
            return [enc, torch.optim.SGD(self.heads.parameters(), lr=0.1)]

    net = TwoOpts()
    bias0 = net.encoder[0].bias.detach().clone()
    heads0 = torch.cat([p.detach().flatten() for p in net.heads.parameters()])
    t = trainer(max_steps=4)
    t.fit(net, loader(make_data(n=32)))
    assert torch.equal(net.encoder[0].bias, bias0)  # lr 0 group
    assert not torch.equal(torch.cat([p.detach().flatten() for p in net.heads.parameters()]), heads0)
    assert t.global_step == 4  # Lightning counts each optimizer's step


def _csv_rows(directory):
    (path,) = glob.glob(f"{directory}/**/metrics.csv", recursive=True)
    with open(path) as f:
        return list(csv.DictReader(f))


def test_logged_keys_and_frequency(tmp_path):
    logger = CSVLogger(tmp_path)
    t = trainer(max_epochs=2, logger=logger, log_every_n_steps=2, callbacks=[UncertaintyWeighting()])
    t.fit(TinyNet(), loader(make_data(n=64)), loader(make_data(n=20, seed=1), batch_size=8))
    rows = _csv_rows(tmp_path)
    keys = set(rows[0])
    for task in "abc":
        assert {f"train/loss/{task}", f"train/weight/{task}", f"val/loss/{task}"} <= keys
        assert f"train/uncertainty/log_var/{task}" in keys
    assert {"train/loss", "val/loss"} <= keys
    train_rows = [r for r in rows if r["train/loss/a"]]
    # 8 steps (4 an epoch), every second one, plus the first step of the run (the last of each epoch is among them)
    assert [r["step"] for r in train_rows] == ["0", "1", "3", "5", "7"]
    val_rows = [r for r in rows if r["val/loss/a"]]
    assert len(val_rows) == 2  # one per epoch
    # val/loss is the unweighted sum of the per-task validation losses
    r = val_rows[-1]
    assert float(r["val/loss"]) == pytest.approx(sum(float(r[f"val/loss/{t}"]) for t in "abc"), rel=1e-5)


def test_validation_loss_is_the_dataset_mean_weighted_by_batch_size():
    net = TinyNet()
    val = make_data(n=20, seed=1)
    t = trainer(max_epochs=1)
    t.validate(net, loader(val, batch_size=8))  # batches of 8, 8, 4
    x, y = val.tensors
    with torch.no_grad():
        z = net.encoder(x)
        expected = torch.nn.functional.mse_loss(net.heads["b"](z).squeeze(1), y[:, 1])
    assert t.callback_metrics["val/loss/b"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_test_stage_logs_per_task_losses():
    t = trainer()
    t.test(TinyNet(), loader(make_data(n=16)))
    assert {"test/loss/a", "test/loss/b", "test/loss/c", "test/loss"} <= set(t.callback_metrics)


def test_tensorboard_custom_scalars_layout(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="run")
    trainer(max_steps=2, logger=logger, log_every_n_steps=1).fit(TinyNet(), loader(make_data(n=32)))
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    assert {"train/loss/a", "train/weight/a", "train/loss"} <= set(acc.Tags()["scalars"])


def test_progress_bar_shows_total_loss_and_no_logger_works():
    t = trainer(max_steps=2, logger=False)
    t.fit(TinyNet(), loader(make_data(n=32)))
    assert "train/loss" in t.progress_bar_metrics


def test_per_task_values_reach_callback_metrics_every_step_but_loggers_only_on_logging_steps(tmp_path):
    t = trainer(
        max_steps=3, logger=CSVLogger(tmp_path), log_every_n_steps=50, callbacks=[UncertaintyWeighting()]
    )
    t.fit(TinyNet(), loader(make_data(n=64)))
    assert {"train/loss/a", "train/weight/c", "train/loss"} <= set(t.callback_metrics)
    # no logging step among the first 3 (4 batches an epoch): only the first step of the run is written
    assert [r["step"] for r in _csv_rows(tmp_path) if r["train/loss/a"]] == ["0"]
