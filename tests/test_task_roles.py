"""Task roles: ``Task(name, role="auxiliary")`` is trained but not reported (Δm%, MTLSummary, compare's table);
TaskAffinity reports auxiliary → main affinity; the auxiliary-tasks example runs."""

from __future__ import annotations

import csv
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TinyNet, loader, make_data, trainer
from torch import nn
from torchmetrics.regression import MeanAbsoluteError

from lightning_mtl import Task
from lightning_mtl.callbacks import DeltaM, MTLSummary, TaskAffinity
from lightning_mtl.metrics import delta_m
from lightning_mtl.task import auxiliary_task_names, build_tasks, main_task_names

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ the field
def test_role_default_and_validation():
    assert Task("a").role == "main" and Task("a", role="auxiliary").role == "auxiliary"
    with pytest.raises(ValueError, match=r"Task 'a': role must be 'main' or 'auxiliary', got 'aux'"):
        Task("a", role="aux")
    tasks = build_tasks(["a", Task("b", role="auxiliary"), Task("c", role="main", partial=True)])
    assert main_task_names(tasks) == ("a", "c") and auxiliary_task_names(tasks) == ("b",)
    assert tasks[2].partial  # the partial-labels flag is kept next to the role


def test_at_least_one_main_task():
    with pytest.raises(ValueError, match=r"Every task is auxiliary \(\['a', 'b'\]\).*at least one main task"):
        build_tasks([Task("a", role="auxiliary"), Task("b", role="auxiliary")])
    with pytest.raises(ValueError, match="at least one main task"):
        TinyNet(tasks=(Task("a", role="auxiliary"),))


# ------------------------------------------------------------------------------------------ Δm%
def test_delta_m_counts_the_given_tasks_only():
    values = {"a/mae": 1.1, "b/mae": 5.0, "c/acc": 0.9}
    baselines = {"a/mae": 1.0, "b/mae": 1.0, "c/acc": 1.0}
    directions = {"a/mae": False, "b/mae": False, "c/acc": True}
    # main a, c: (+10 % worse mae, -10 % acc -> +10) / 2 = +10; b (+400 %) left out
    assert delta_m(values, baselines, directions, tasks=("a", "c")) == pytest.approx(10.0)
    assert delta_m(values, baselines, directions) == pytest.approx((10 + 400 + 10) / 3)
    with pytest.raises(ValueError, match=r"no baseline metric belongs to the tasks \['z'\]"):
        delta_m(values, baselines, directions, tasks=("z",))


class RoleNet(TinyNet):
    """Tasks ``a`` (main, MAE), ``b`` (auxiliary, MAE), ``c`` (main); ``(losses, outputs)``."""

    def __init__(self, **kwargs):
        tasks = [
            Task("a", metrics={"mae": MeanAbsoluteError()}),
            Task("b", role="auxiliary", metrics={"mae": MeanAbsoluteError()}),
            Task("c"),
        ]
        super().__init__(tasks=tasks, **kwargs)

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        preds = {t: self.heads[t](z).squeeze(1) for t in self.task_names}
        losses = {t: nn.functional.mse_loss(preds[t], y[:, i]) for i, t in enumerate(self.task_names)}
        return losses, {"a": (preds["a"], y[:, 0]), "b": (preds["b"], y[:, 1])}


def test_delta_m_callback_and_summary_use_the_main_tasks(capsys):
    summary = MTLSummary()
    baselines = {"a/mae": 1.0, "b/mae": 2.0, "c/loss": 3.0}
    t = trainer(max_epochs=2, callbacks=[DeltaM(baselines), summary], log_every_n_steps=1)
    with pytest.warns(UserWarning, match=r"baselines \['b/mae'\] belong to auxiliary tasks"):
        t.fit(RoleNet(), loader(make_data(n=32)), loader(make_data(n=32, seed=1)))
    logged = {k: float(v) for k, v in t.callback_metrics.items()}
    expected = 100 * ((logged["val/a/mae"] - 1.0) / 1.0 + (logged["val/loss/c"] - 3.0) / 3.0) / 2
    assert logged["val/delta_m"] == pytest.approx(expected, rel=1e-5)
    # the summary's rows are the main tasks; the auxiliary task has its own section, without metrics
    assert [r["task"] for r in summary.rows] == ["a", "c"]
    assert [r["task"] for r in summary.auxiliary_rows] == ["b"]
    assert summary.auxiliary_rows[0]["metrics"] == {} and summary.auxiliary_rows[0]["weight"] == 1.0
    assert summary.auxiliary_rows[0]["train_loss"] == pytest.approx(logged["train/loss/b"])
    md = summary.to_markdown()
    assert "| b (auxiliary) | 1 |" in md and md.index("| a |") < md.index("| c |") < md.index("b (auxiliary)")
    assert "b (auxiliary)" in capsys.readouterr().out


def test_delta_m_with_only_auxiliary_baselines_is_an_error():
    with pytest.raises(ValueError, match=r"every baseline \['b/mae'\] belongs to an auxiliary task"):
        trainer(callbacks=[DeltaM({"b/mae": 1.0})]).fit(
            RoleNet(), loader(make_data(n=16)), loader(make_data(n=16))
        )


# ------------------------------------------------------------------------------------------ TaskAffinity
def test_task_affinity_reports_auxiliary_to_main(capsys):
    cb = TaskAffinity(every_n_steps=1, lr=0.1, print_table=True)
    trainer(max_epochs=1, callbacks=[cb]).fit(RoleNet(), loader(make_data(n=32), batch_size=8))
    assert cb.main_tasks == ("a", "c") and cb.auxiliary_tasks == ("b",)
    full, aux = cb.table(), cb.auxiliary_table()
    assert set(aux) == {"b"} and set(aux["b"]) == {"a", "c"}
    assert aux["b"] == pytest.approx({"a": full["b"]["a"], "c": full["b"]["c"]})
    out = capsys.readouterr().out
    assert "auxiliary → main affinity" in out and f"{aux['b']['a']:+.3g}" in out


def test_task_affinity_without_auxiliary_tasks_has_no_auxiliary_table():
    cb = TaskAffinity(every_n_steps=1, lr=0.1)
    trainer(max_epochs=1, callbacks=[cb]).fit(TinyNet(), loader(make_data(n=16), batch_size=8))
    assert cb.auxiliary_table() == {} and set(cb.table()) == {"a", "b", "c"}


# ------------------------------------------------------------------------------------------ compare, example
@pytest.mark.timeout(300)
def test_compare_reports_the_main_tasks_only(tmp_path, monkeypatch):
    from lightning_mtl.cli import main

    monkeypatch.chdir(ROOT)  # the config names examples.auxiliary_tasks
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "enable_checkpointing": False,
            "callbacks": [
                {"class_path": "lightning_mtl.strategies.gcs.GCS", "init_args": {"weighted": True}},
                {
                    "class_path": "lightning_mtl.callbacks.DeltaM",
                    "init_args": {"baselines": {"target/mae": 0.5, "factors/mae": 0.1}},
                },
            ],
        },
        "model": {"class_path": "examples.auxiliary_tasks.AuxNet"},
        "data": {"class_path": "examples.auxiliary_tasks.AuxDataModule"},
    }
    path = tmp_path / "aux.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    main(["compare", "--config", str(path), "--epochs", "1", "--out", str(out), "--quiet"])
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["strategy"] for r in rows] == ["GCS"]  # the config's strategy, built by LightningCLI from YAML
    assert set(rows[0]) >= {"target/mae", "target/loss", "delta_m"}
    assert not any(k.startswith(("factors/", "noise/")) for k in rows[0])
    expected = 100 * (float(rows[0]["target/mae"]) - 0.5) / 0.5
    assert float(rows[0]["delta_m"]) == pytest.approx(expected, rel=1e-4)
    assert "auxiliary, not reported: factors, noise" in (out / "results.md").read_text()


@pytest.mark.timeout(300)
def test_auxiliary_tasks_example_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["auxiliary_tasks.py", "--strategy", "gcs", "--epochs", "1"])
    runpy.run_path(str(ROOT / "examples" / "auxiliary_tasks.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "gcs: main-task val MAE" in out and "'noise'" in out
    assert torch.isfinite(torch.tensor(float(out.split("MAE")[1].split()[0])))
