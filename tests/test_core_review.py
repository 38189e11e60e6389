"""Regressions found reviewing the core: reuse of a strategy across fits, several evaluation dataloaders,
hyper-parameter validation."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TinyNet, flat_params, loader, make_data, restore_environ, trainer
from lightning.pytorch import Callback
from torch import nn
from torchmetrics.regression import MeanAbsoluteError

from lightning_mtl import Task
from lightning_mtl.callbacks import DeltaM, GradientConflictMonitor, TaskAffinity
from lightning_mtl.strategies import (
    DWA,
    GLS,
    MGDA,
    RLW,
    GradNorm,
    GradVac,
    NashMTL,
    PCGrad,
    StaticWeighting,
    UncertaintyWeighting,
)

STATEFUL = {
    "uncertainty": lambda: UncertaintyWeighting(lr=0.1),
    "dwa": lambda: DWA(),
    "rlw": lambda: RLW(seed=3),
    "gradnorm": lambda: GradNorm(),
    "pcgrad": lambda: PCGrad(seed=3),
    "gradvac": lambda: GradVac(beta=0.5, seed=3),
    "nash": lambda: NashMTL(update_every=2),
    "mgda-update-every": lambda: MGDA(update_every=3),
}


def _fit(strategy, epochs: int = 3):
    model = TinyNet(optimizer="adam", lr=0.01)
    callbacks = [strategy, GradientConflictMonitor(every_n_steps=2), TaskAffinity(every_n_steps=2)]
    trainer(max_epochs=epochs, callbacks=callbacks).fit(model, loader(make_data()))
    return model, callbacks


@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_strategy_reused_for_a_new_fit_starts_afresh(name):
    fresh_model, (fresh, fresh_gcm, fresh_aff) = _fit(STATEFUL[name]())
    reused = STATEFUL[name]()
    _fit(reused)  # learns weights, loss history, generator state, L(0) ...
    model, (_, gcm, aff) = _fit(reused)  # ... which must not leak into a new run
    torch.testing.assert_close(flat_params(model), flat_params(fresh_model), atol=0, rtol=0)
    assert reused.weights == fresh.weights
    assert gcm._count == fresh_gcm._count and aff._count == fresh_aff._count


def test_a_continued_fit_on_the_same_trainer_keeps_the_strategy_state():
    strategy, model = UncertaintyWeighting(lr=0.1), TinyNet()
    t = trainer(max_epochs=1, callbacks=[strategy])
    t.fit(model, loader(make_data()))
    after_first = strategy.params.detach().clone()
    t.fit_loop.max_epochs = 2
    t.fit(model, loader(make_data()))
    # continued from the learned values: one more epoch moves them further from the init 0
    assert (strategy.params.detach().abs() > after_first.abs()).all()


class MetricTiny(TinyNet):
    def __init__(self) -> None:
        super().__init__(tasks=[Task("a", metrics={"mae": MeanAbsoluteError()}), "b", "c"])

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        preds = {t: self.heads[t](z).squeeze(1) for t in self.task_names}
        losses = {t: nn.functional.mse_loss(preds[t], y[:, i]) for i, t in enumerate(self.task_names)}
        return losses, {"a": (preds["a"], y[:, 0])}


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_several_eval_dataloaders_are_averaged_and_logged_separately(stage):
    first, second = make_data(n=32, seed=1), make_data(n=24, seed=2)
    s = "val" if stage == "validate" else "test"
    single = [getattr(trainer(), stage)(MetricTiny(), loader(ds), verbose=False)[0] for ds in (first, second)]
    (result, _) = getattr(trainer(), stage)(MetricTiny(), [loader(first), loader(second)], verbose=False)
    for k, expected in enumerate(single):
        for key in (f"{s}/loss/a", f"{s}/loss/c", f"{s}/loss", f"{s}/a/mae"):
            assert result[f"{key}/dataloader_idx_{k}"] == pytest.approx(expected[key], rel=1e-5), (key, k)
    assert f"{s}/loss/a" not in result  # no pooled value mixing the two data sets


def test_delta_m_uses_the_first_validation_dataloader():
    first, second = make_data(n=32, seed=1), make_data(n=24, seed=2)
    delta = DeltaM({"a/loss": 1.0})
    trainer(callbacks=[delta]).validate(TinyNet(), [loader(first), loader(second)], verbose=False)
    [single] = trainer().validate(TinyNet(), loader(first), verbose=False)
    assert delta.last["val"] == pytest.approx(100 * (single["val/loss/a"] - 1.0), rel=1e-5)


class RecordVal(Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        torch.save(metrics, os.path.join(self.directory, f"val{trainer.global_rank}.pt"))


@pytest.mark.timeout(120)
def test_several_validation_dataloaders_under_ddp(tmp_path):
    first, second = make_data(n=32, seed=1), make_data(n=24, seed=2)
    single = trainer().validate(TinyNet(), [loader(first), loader(second)], verbose=False)[0]
    with restore_environ():
        trainer(strategy="ddp_spawn", devices=2, callbacks=[RecordVal(str(tmp_path))]).validate(
            TinyNet(), [loader(first, 8), loader(second, 8)], verbose=False
        )
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"val{rank}.pt", weights_only=True)
        for key in (
            "val/loss/a/dataloader_idx_0",
            "val/loss/b/dataloader_idx_1",
            "val/loss/dataloader_idx_1",
        ):
            assert ddp[key] == pytest.approx(single[key], rel=1e-5), key


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: StaticWeighting({"a": True, "b": 1.0, "c": 1.0}), "True"),
        (lambda: UncertaintyWeighting(init=float("nan")), "init.*nan"),
        (lambda: UncertaintyWeighting(bounds=(0, float("nan"))), "bounds.*nan"),
        (lambda: UncertaintyWeighting(lr=float("inf")), "lr.*inf"),
        (lambda: DWA(temperature=float("inf")), "temperature.*inf"),
        (lambda: DWA(temperature="2"), "temperature.*'2'"),
        (lambda: RLW(concentration=float("inf")), "concentration.*inf"),
        (lambda: RLW(seed=1.5), "seed.*1.5"),
        (lambda: GradNorm(min_weight=float("inf")), "min_weight.*inf"),
        (lambda: DeltaM({"a/loss": float("nan")}), "a/loss.*nan"),
        (lambda: TinyNet(gradient_clip_val="1"), "gradient_clip_val.*'1'"),
        (lambda: TinyNet(accumulate_grad_batches=True), "accumulate_grad_batches.*True"),
    ],
)
def test_more_invalid_hyper_parameters_fail_at_construction(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_gls_strategy_reused_is_still_stateless():
    # a stateless strategy object can be shared by two fits (nothing to reset, nothing breaks)
    gls = GLS()
    _fit(gls, epochs=1)
    _fit(gls, epochs=1)


class LoggingTiny(TinyNet):
    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        self.log("user/loss_a", losses["a"].detach(), on_step=False, on_epoch=True)
        return losses


def test_task_affinity_lookahead_does_not_reach_the_users_logs():
    def run(callbacks):
        t = trainer(max_epochs=1, callbacks=callbacks)
        t.fit(LoggingTiny(), loader(make_data()))
        return float(t.callback_metrics["user/loss_a"])

    assert run([TaskAffinity(every_n_steps=1, lr=0.5)]) == pytest.approx(run([]), rel=1e-6)
