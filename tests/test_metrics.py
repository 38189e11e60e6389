"""Per-task metrics: Task(metrics=...) validation, the (losses, outputs) hook, logged values."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyNet, loader, make_data, trainer
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

from lightning_mtl import Task
from lightning_mtl.metrics import TaskMetrics, split_task_output


def metric_tasks() -> list[Task]:
    return [
        Task("a", metrics={"mae": MeanAbsoluteError()}),
        Task("b", metrics=MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()})),
        Task("c"),
    ]


class MetricNet(TinyNet):
    """TinyNet whose tasks a and b have metrics; task_losses returns (losses, outputs)."""

    def __init__(self, lr: float = 0.05, **kwargs) -> None:
        super().__init__(tasks=metric_tasks(), lr=lr, **kwargs)
        self.calls = 0

    def predictions(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(x)
        return {t: self.heads[t](z).squeeze(1) for t in self.task_names}

    def task_losses(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        preds = self.predictions(x)
        losses = {t: nn.functional.mse_loss(preds[t], y[:, i]) for i, t in enumerate(self.task_names)}
        return losses, {"a": (preds["a"], y[:, 0]), "b": (preds["b"], y[:, 1])}


def expected_metrics(model: MetricNet, ds) -> dict[str, float]:
    x, y = ds.tensors
    with torch.no_grad():
        p = model.predictions(x)
    return {
        "a/mae": float((p["a"] - y[:, 0]).abs().mean()),
        "b/mse": float(((p["b"] - y[:, 1]) ** 2).mean()),
        "b/mae": float((p["b"] - y[:, 1]).abs().mean()),
    }


def test_validation_metrics_match_hand_computed_values():
    model, ds = MetricNet(), make_data(n=40)
    [result] = trainer().validate(model, loader(ds, batch_size=16), verbose=False)  # uneven last batch
    for key, value in expected_metrics(model, ds).items():
        assert result[f"val/{key}"] == pytest.approx(value, rel=1e-5)
    assert "val/c/mae" not in result
    assert model.calls == 3  # one forward per batch: metrics reuse the loss's predictions


def test_test_stage_metrics_are_logged():
    model, ds = MetricNet(), make_data(n=32)
    [result] = trainer().test(model, loader(ds), verbose=False)
    assert result["test/a/mae"] == pytest.approx(expected_metrics(model, ds)["a/mae"], rel=1e-5)


def test_train_metrics_logged_once_per_epoch_with_epoch_values():
    # lr=0: the model does not move, so the epoch's train metric is the metric on the whole training set
    model, ds = MetricNet(lr=0.0), make_data(n=48)
    t = trainer(max_epochs=2, limit_val_batches=0)
    t.fit(model, loader(ds))
    expected = expected_metrics(model, ds)
    for key, value in expected.items():
        assert float(t.callback_metrics[f"train/{key}"]) == pytest.approx(value, rel=1e-5)
    # state was reset between epochs: a second epoch does not double-count
    assert model.task_metrics is not None
    assert not model.task_metrics._updated[("train", 0)]


def test_metrics_follow_training():
    model, ds = MetricNet(lr=0.05), make_data(n=48)
    t = trainer(max_epochs=3)
    t.fit(model, loader(ds), loader(ds))
    assert float(t.callback_metrics["val/a/mae"]) == pytest.approx(
        expected_metrics(model, ds)["a/mae"], rel=1e-5
    )


def test_missing_outputs_error_names_the_tasks():
    class NoOutputs(MetricNet):
        def task_losses(self, batch, batch_idx):
            return super().task_losses(batch, batch_idx)[0]

    with pytest.raises(ValueError, match=r"declare metrics.*\(losses, outputs\)"):
        trainer().validate(NoOutputs(), loader(make_data(n=16)), verbose=False)


def test_output_for_one_task_missing_or_unknown():
    class MissingB(MetricNet):
        def task_losses(self, batch, batch_idx):
            losses, outputs = super().task_losses(batch, batch_idx)
            return losses, {"a": outputs["a"]}

    class UnknownC(MetricNet):
        def task_losses(self, batch, batch_idx):
            losses, outputs = super().task_losses(batch, batch_idx)
            return losses, {**outputs, "c": outputs["a"]}

    with pytest.raises(KeyError, match="task 'b' declares metrics"):
        trainer().validate(MissingB(), loader(make_data(n=16)), verbose=False)
    with pytest.raises(KeyError, match=r"\['c'\], which declare no metrics"):
        trainer().validate(UnknownC(), loader(make_data(n=16)), verbose=False)


def test_split_task_output():
    losses = {"a": torch.tensor(1.0)}
    assert split_task_output(losses) == (losses, None)
    assert split_task_output((losses, {"a": (1, 2)}))[1] == {"a": (1, 2)}
    with pytest.raises(TypeError, match="tuple of 3 items"):
        split_task_output((losses, {}, {}))
    with pytest.raises(TypeError, match="outputs must map"):
        split_task_output((losses, [1]))


class NoDirection(Metric):
    def __init__(self):
        super().__init__()
        self.add_state("total", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, preds, target):
        self.total += (preds - target).sum()

    def compute(self):
        return self.total


def test_task_metric_spec_validation():
    assert Task("a", metrics=MeanAbsoluteError()).metrics is not None
    tm = TaskMetrics([Task("a", metrics=[MeanAbsoluteError(), R2Score()])])
    assert tm.higher_is_better == {"a/MeanAbsoluteError": False, "a/R2Score": True}
    with pytest.raises(ValueError, match=r"'x'.*does not declare whether higher is better.*higher_is_better"):
        Task("a", metrics={"x": NoDirection()})
    tm = TaskMetrics([Task("a", metrics={"x": NoDirection()}, higher_is_better={"x": True})])
    assert tm.higher_is_better == {"a/x": True}
    override = TaskMetrics([Task("a", metrics={"mae": MeanAbsoluteError()}, higher_is_better={"mae": True})])
    assert override.higher_is_better == {"a/mae": True}
    with pytest.raises(TypeError, match="Task 'a': metrics must be a torchmetrics Metric"):
        Task("a", metrics="mae")
    with pytest.raises(TypeError, match="metric 'm' must be a torchmetrics.Metric"):
        Task("a", metrics={"m": nn.Linear(1, 1)})
    with pytest.raises(ValueError, match="metric name 'bad name' is invalid"):
        Task("a", metrics={"bad name": MeanAbsoluteError()})
    with pytest.raises(KeyError, match=r"higher_is_better names unknown metric\(s\) \['mse'\]"):
        Task("a", metrics={"mae": MeanAbsoluteError()}, higher_is_better={"mse": False})
    with pytest.raises(ValueError, match="given without metrics"):
        Task("a", higher_is_better={"mae": False})
    with pytest.raises(ValueError, match="two metrics of class MeanAbsoluteError"):
        Task("a", metrics=[MeanAbsoluteError(), MeanAbsoluteError()])


def test_non_scalar_metric_is_rejected_at_compute():
    class Vector(NoDirection):
        def compute(self):
            return torch.stack([self.total, self.total])

    tm = TaskMetrics([Task("a", metrics={"v": Vector()}, higher_is_better={"v": True})])
    tm.update("val", {"a": (torch.ones(3), torch.zeros(3))})
    with pytest.raises(ValueError, match=r"task 'a': metric 'v' returned \(2,\), not a scalar"):
        tm.compute("val")


def test_stage_clones_are_independent_and_metrics_move_with_module():
    tm = TaskMetrics(metric_tasks())
    tm.update("train", {"a": (torch.ones(2), torch.zeros(2)), "b": (torch.ones(2), torch.ones(2))})
    assert tm.compute("val") == {}
    assert tm.compute("train")["a/mae"] == pytest.approx(1.0)
    model = MetricNet()
    assert any(isinstance(m, MeanAbsoluteError) for m in model.modules())
    assert not any("task_metrics" in k for k in model.state_dict())  # metric state is not checkpointed
