"""What a user first sees in the logs (issue 7, items 10 and 11): a short run still shows every per-step series,
and DDP raises no false "use sync_dist=True" alarm for values the module has already reduced."""

from __future__ import annotations

import glob
import os
import pathlib
import re
import warnings

import pytest
import torch
from helpers import TinyNet, loader, make_data, restore_environ, trainer
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torchmetrics.regression import MeanAbsoluteError

from lightning_mtl import Task

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _scalars(log_dir: str) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_the_readme_quick_start_shows_the_task_weights_in_tensorboard(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # 2 epochs of 8 steps, log_every_n_steps=50
    namespace["trainer"].logger.experiment.flush()
    (log_dir,) = glob.glob(str(tmp_path / "runs" / "**" / "version_0"), recursive=True)
    scalars = _scalars(log_dir)
    for key in ("train/weight/depth", "train/weight/seg", "train/loss/depth", "train/loss"):
        assert scalars.get(key) == [0, 7, 15], (key, sorted(scalars))  # first step, end of each epoch


def test_per_step_values_go_to_the_loggers_on_the_first_step_and_at_each_epoch_end(tmp_path):
    t = trainer(max_epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=3)
    t.fit(TinyNet(), loader(make_data(n=80)))  # 5 steps an epoch
    (path,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    with open(path) as f:
        steps = [row.split(",")[1] for row in f.read().splitlines()[1:] if row.split(",")[2]]
    assert steps == ["0", "2", "4", "5", "8", "9"]  # first, every 3rd (2, 5, 8), last of each epoch (4, 9)


def test_log_every_n_steps_zero_still_writes_nothing(tmp_path):
    t = trainer(max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=0)
    t.fit(TinyNet(), loader(make_data(n=32)))
    assert "train/loss/a" not in t.logged_metrics


class MetricTiny(TinyNet):
    def __init__(self) -> None:
        super().__init__(tasks=[Task("a", metrics={"mae": MeanAbsoluteError()}), "b", "c"])

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        preds = {t: self.heads[t](z).squeeze(1) for t in self.task_names}
        losses = {t: nn.functional.mse_loss(preds[t], y[:, i]) for i, t in enumerate(self.task_names)}
        return losses, {"a": (preds["a"], y[:, 0])}


class RecordWarnings(Callback):
    """Records, per rank, every warning raised between setup and teardown (spawned processes)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def setup(self, trainer, pl_module, stage) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")

    def teardown(self, trainer, pl_module, stage) -> None:
        self._catcher.__exit__(None, None, None)
        messages = [str(w.message) for w in self._caught]
        torch.save(messages, os.path.join(self.directory, f"warnings{trainer.global_rank}.pt"))


@pytest.mark.timeout(180)
def test_ddp_epoch_logs_raise_no_sync_dist_false_alarm(tmp_path):
    data = make_data(n=32)
    with restore_environ():
        t = trainer(strategy="ddp_spawn", devices=2, max_epochs=1, callbacks=[RecordWarnings(str(tmp_path))])
        t.fit(MetricTiny(), loader(data, 8), loader(make_data(n=16, seed=1), 8))
    messages = torch.load(tmp_path / "warnings0.pt", weights_only=True)
    alarms = [m for m in messages if "sync_dist=True" in m]
    assert not alarms, alarms
    assert {"val/loss/a", "val/loss", "val/a/mae", "train/a/mae"} <= set(
        t.callback_metrics
    )  # they were logged
