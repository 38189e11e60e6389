"""DTP (Guo et al., ECCV 2018): hand-computed weights, invariants, the per-batch KPI, errors, fit, resume, DDP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import ddp_parity_records, dummy_loader, flat_params, loader, make_data, trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryHammingDistance,
    MulticlassAccuracy,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.functional.classification import binary_accuracy, binary_auroc, binary_f1_score
from torchmetrics.regression import MeanAbsoluteError, PearsonCorrCoef

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.functional.dtp import (
    DTP_EPS,
    dtp_ema,
    dtp_focal_weight,
    dtp_loss,
    dtp_weights,
    focal_weight_bound,
)
from lightning_mtl.strategies.dtp import DTP


def fl(k: float, g: float) -> float:
    return -((1 - k) ** g) * math.log(k)


# ------------------------------------------------------------------------------------------ models
def kpi_tasks(b_metrics=None, **b_kwargs) -> list[Task]:
    return [
        Task("a", kind="classification", metrics={"acc": BinaryAccuracy()}),
        Task(
            "b",
            kind="classification",
            metrics=b_metrics or {"acc": MulticlassAccuracy(num_classes=3, average="micro")},
            **b_kwargs,
        ),
    ]


class KPINet(MultiTaskModule):
    """Shared encoder; task a: binary classification (sign of y₀), task b: 3 classes (y₁ in thirds). Each task
    returns (preds, target) for its metrics; ``batch_kpi`` records each step's hand-computed batch accuracy."""

    def __init__(self, lr: float = 0.1, tasks=None, optimizer: str = "sgd", **kwargs) -> None:
        super().__init__(tasks=tasks or kpi_tasks(), **kwargs)
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 3)})
        self.lr, self.optimizer_name = lr, optimizer
        self.batch_kpi: list[list[float]] = []
        self.batch_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def predict(self, batch):
        """``(pa, pb, ya, yb)``: task a's logits and binary targets, task b's logits and class targets."""
        x, y = batch
        z = self.encoder(x)
        ya = (y[:, 0] > 0).long()
        yb = torch.bucketize(y[:, 1].contiguous(), torch.tensor([-1.5, 1.5]))
        return self.heads["a"](z).squeeze(1), self.heads["b"](z), ya, yb

    def task_losses(self, batch, batch_idx):
        pa, pb, ya, yb = self.predict(batch)
        if torch.is_grad_enabled():
            acc_a = float(((pa > 0).long() == ya).float().mean())
            acc_b = float((pb.argmax(1) == yb).float().mean())
            self.batch_kpi.append([acc_a, acc_b])
            self.batch_outputs.append((pa.detach().sigmoid(), ya))
        losses = {
            "a": nn.functional.binary_cross_entropy_with_logits(pa.float(), ya.float()),
            "b": nn.functional.cross_entropy(pb.float(), yb),
        }
        return losses, {"a": (pa.detach().float().sigmoid(), ya), "b": (pb.detach().float(), yb)}

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class FixedKPINet(MultiTaskModule):
    """One scalar θ, losses (θ − 0)² and 2(θ − 3)² (as helpers.ScalarNet), and fixed predictions: task t0 is
    right on 3 of 4 examples (accuracy 0.75), task t1 on 1 of 4 (accuracy 0.25), on every batch."""

    def __init__(self, lr: float = 0.1, t1_partial: bool = False) -> None:
        super().__init__(
            tasks=[
                Task("t0", metrics={"acc": BinaryAccuracy()}),
                Task("t1", metrics={"acc": BinaryAccuracy()}, partial=t1_partial),
            ]
        )
        self.theta = nn.Parameter(torch.tensor(1.0))
        self.lr = lr

    def task_losses(self, batch, batch_idx):
        ones = torch.ones(4, dtype=torch.long)
        outputs = {
            "t0": (torch.tensor([1.0, 1.0, 1.0, 0.0]), ones),
            "t1": (torch.tensor([1.0, 0.0, 0.0, 0.0]), ones),
        }
        return {"t0": self.theta**2, "t1": 2 * (self.theta - 3) ** 2}, outputs

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class KPIRecorder(Callback):
    """The strategy's KPI averages after every training batch."""

    def __init__(self) -> None:
        self.averages: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.averages.append(dict(pl_module.strategy.kpi_average))


def bound_dtp(names=("a", "b"), **kwargs) -> DTP:
    tasks = [Task(n, metrics={"acc": BinaryAccuracy()}) for n in names]
    s = DTP(**kwargs)
    s.bind(tasks)
    return s


# ------------------------------------------------------------------------------------------ hand-computed
def test_focal_weight_hand_computed():
    # −(1−κ)^γ log κ:  κ=0.5, γ=2: −0.25·ln 0.5 = 0.1732868;  κ=0.9, γ=1: −0.1·ln 0.9 = 0.0105361;
    # γ=0 is −ln κ: κ=0.2 -> 1.6094379
    w = dtp_focal_weight(torch.tensor([0.5, 0.9, 0.2], dtype=torch.float64), torch.tensor([2.0, 1.0, 0.0]))
    torch.testing.assert_close(
        w, torch.tensor([0.1732868, 0.0105361, 1.6094379], dtype=torch.float64), atol=1e-7, rtol=0
    )
    # the clamp: κ = 0 is read as ε = 1e-3: −(0.999)² ln 1e-3 = 6.8939...; κ = 1 as 1 − ε: −1e-6·ln 0.999
    w = dtp_focal_weight(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert (
        float(w[0]) == pytest.approx(-(0.999**2) * math.log(1e-3)) == pytest.approx(focal_weight_bound(2.0))
    )
    assert float(w[1]) == pytest.approx(-(1e-3**2) * math.log(0.999))


def test_three_steps_by_hand():
    # α = 0.5, γ = 2. Step 1: no average yet -> weights 1; κ̄ = κ₁ = (0.5, 0.8).
    s = bound_dtp(alpha=0.5, gamma=2.0)
    w1 = s.step_weights(torch.tensor([0.5, 0.8]))
    assert w1.tolist() == [1.0, 1.0]
    torch.testing.assert_close(s._kpi_ema, torch.tensor([0.5, 0.8], dtype=torch.float64))
    # Step 2: weights from κ̄ = (0.5, 0.8): (0.25·ln 2, 0.04·(−ln 0.8)) = (0.1732868, 0.0089257);
    # then κ̄ = 0.5·(0.7, 0.6) + 0.5·(0.5, 0.8) = (0.6, 0.7)
    w2 = s.step_weights(torch.tensor([0.7, 0.6]))
    torch.testing.assert_close(
        w2, torch.tensor([0.1732868, 0.0089257], dtype=torch.float64), atol=1e-7, rtol=0
    )
    torch.testing.assert_close(s._kpi_ema, torch.tensor([0.6, 0.7], dtype=torch.float64))
    # Step 3: weights from (0.6, 0.7): (0.16·(−ln 0.6), 0.09·(−ln 0.7)) = (0.0817321, 0.0321007);
    # then κ̄ = 0.5·(0.1, 1.0) + 0.5·(0.6, 0.7) = (0.35, 0.85)
    w3 = s.step_weights(torch.tensor([0.1, 1.0]))
    torch.testing.assert_close(
        w3, torch.tensor([0.0817321, 0.0321007], dtype=torch.float64), atol=1e-7, rtol=0
    )
    torch.testing.assert_close(s._kpi_ema, torch.tensor([0.35, 0.85], dtype=torch.float64))
    assert s._count == 3
    logged = s.extra_metrics()  # the averages are logged at logging steps
    assert sorted(logged) == ["train/dtp/kpi/a", "train/dtp/kpi/b"]
    assert float(logged["train/dtp/kpi/a"]) == pytest.approx(0.35)
    # the next weights, from (0.35, 0.85), put the lagging task first
    w4 = s.step_weights(torch.tensor([0.5, 0.5]))
    assert w4.tolist() == pytest.approx([fl(0.35, 2), fl(0.85, 2)])


def test_per_task_gamma_and_the_functional_loss():
    s = bound_dtp(alpha=1.0, gamma={"a": 0.0, "b": 3.0})
    s.step_weights(torch.tensor([0.4, 0.4]))
    w = s.step_weights(torch.tensor([0.4, 0.4]))
    assert w.tolist() == pytest.approx([-math.log(0.4), fl(0.4, 3)])
    losses = torch.tensor([2.0, 5.0], requires_grad=True)
    total = dtp_loss(losses, torch.tensor([0.4, 0.4]), torch.tensor([0.0, 3.0]))
    total.backward()
    assert float(total.detach()) == pytest.approx(2 * -math.log(0.4) + 5 * fl(0.4, 3), rel=1e-6)
    assert losses.grad.tolist() == pytest.approx([-math.log(0.4), fl(0.4, 3)], rel=1e-6)


def test_ema_starts_at_the_first_kpi_and_skips_nan():
    e = dtp_ema(None, torch.tensor([0.2, math.nan]), 0.3)
    assert e[0] == pytest.approx(0.2) and math.isnan(float(e[1]))
    # task 1 has no average yet: it starts at its first defined KPI; task 0: 0.3·0.6 + 0.7·0.2 = 0.32
    e = dtp_ema(e, torch.tensor([0.6, 0.9]), 0.3)
    assert e.tolist() == pytest.approx([0.32, 0.9])
    e = dtp_ema(e, torch.tensor([math.nan, 0.5]), 0.3)  # an undefined KPI keeps the average
    assert e.tolist() == pytest.approx([0.32, 0.3 * 0.5 + 0.7 * 0.9])
    w = dtp_weights(torch.tensor([0.5, math.nan]))  # a task without an average yet: weight 1
    assert w.tolist() == pytest.approx([fl(0.5, 2), 1.0])


def test_hand_computed_update_in_a_fit():
    # θ₀ = 1, L = (θ², 2(θ−3)²), lr 0.1; accuracies (0.75, 0.25) on every batch; α = 0.5, γ = 2.
    # step 1: weights 1: ∇ = 2·1 + 4·(1−3) = −6 -> θ₁ = 1.6; κ̄ = (0.75, 0.25)
    # step 2: weights (FL(0.75), FL(0.25)) = (0.0625·ln(4/3), 0.5625·ln 4) = (0.0179801, 0.7797905)
    net = FixedKPINet(lr=0.1)
    strategy = DTP(alpha=0.5, gamma=2.0)
    trainer(max_steps=2, max_epochs=-1, callbacks=[strategy]).fit(net, dummy_loader(2))
    theta1 = 1.6
    w = np.array([fl(0.75, 2), fl(0.25, 2)])
    grad = w[0] * 2 * theta1 + w[1] * 4 * (theta1 - 3)
    assert net.theta.item() == pytest.approx(theta1 - 0.1 * grad, abs=1e-6)
    assert list(strategy.weights.values()) == pytest.approx(w.tolist(), abs=1e-6)
    assert strategy.kpi_average == pytest.approx({"t0": 0.75, "t1": 0.25})


# ------------------------------------------------------------------------------------------ partial labels
class PartialKPINet(FixedKPINet):
    """FixedKPINet with t1 partial: absent (no loss, no metric output) at the batches ``absent``."""

    def __init__(self, absent=(1,), lr: float = 0.1) -> None:
        super().__init__(lr=lr, t1_partial=True)
        self.absent = set(absent)

    def task_losses(self, batch, batch_idx):
        losses, outputs = super().task_losses(batch, batch_idx)
        if batch_idx in self.absent:
            del losses["t1"], outputs["t1"]
        return losses, outputs


def test_an_absent_task_has_weight_zero_and_keeps_its_average():
    # θ₀ = 1, α = 0.5, γ = 2. Step 1 (both labelled): weights 1, θ₁ = 1.6, κ̄ = (0.75, 0.25).
    # Step 2 (t1 absent): t0's weight FL(0.75) as before (no renormalisation), t1's 0 and κ̄_t1 unchanged:
    # θ₂ = θ₁ − 0.1·FL(0.75)·2θ₁. Step 3 (t1 back): weights (FL(0.75), FL(0.25)).
    net, strategy, record = PartialKPINet(absent=(1,)), DTP(alpha=0.5, gamma=2.0), KPIRecorder()
    weights = []

    class Weights(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights.append(dict(pl_module.strategy.weights))

    trainer(max_steps=3, max_epochs=-1, callbacks=[strategy, record, Weights()]).fit(net, dummy_loader(3))
    assert weights[1] == pytest.approx({"t0": fl(0.75, 2), "t1": 0.0}, abs=1e-6)
    assert weights[2] == pytest.approx({"t0": fl(0.75, 2), "t1": fl(0.25, 2)}, abs=1e-6)
    assert record.averages[1] == pytest.approx({"t0": 0.75, "t1": 0.25})
    theta2 = 1.6 - 0.1 * fl(0.75, 2) * 2 * 1.6
    grad3 = fl(0.75, 2) * 2 * theta2 + fl(0.25, 2) * 4 * (theta2 - 3)
    assert net.theta.item() == pytest.approx(theta2 - 0.1 * grad3, abs=1e-6)


def test_a_task_absent_at_the_first_step_starts_its_average_when_it_comes():
    # t1 absent at step 1: its average is undefined (NaN) until step 2, where it has weight 1 (no average yet)
    net, strategy, record = PartialKPINet(absent=(0,)), DTP(alpha=0.5, gamma=2.0), KPIRecorder()
    trainer(max_steps=2, max_epochs=-1, callbacks=[strategy, record]).fit(net, dummy_loader(2))
    assert record.averages[0]["t0"] == 0.75 and math.isnan(record.averages[0]["t1"])
    assert record.averages[1] == pytest.approx({"t0": 0.75, "t1": 0.25})
    assert strategy.weights == pytest.approx({"t0": fl(0.75, 2), "t1": 1.0})


class MaskedKPINet(KPINet):
    """KPINet with task b labelled on the samples with ``x[:, 1] > 0`` only: its loss is their masked mean and
    its metric outputs are theirs; ``labelled_kpi`` records b's hand-computed accuracy on them."""

    def __init__(self, **kwargs) -> None:
        tasks = kpi_tasks(partial=True)
        super().__init__(tasks=tasks, **kwargs)
        self.labelled_kpi: list[float] = []

    def task_losses(self, batch, batch_idx):
        from lightning_mtl import masked_mean

        pa, pb, ya, yb = self.predict(batch)
        mask = batch[0][:, 1] > 0
        self.labelled_kpi.append(float((pb[mask].argmax(1) == yb[mask]).float().mean()))
        losses = {
            "a": nn.functional.binary_cross_entropy_with_logits(pa, ya.float()),
            "b": masked_mean(nn.functional.cross_entropy(pb, yb, reduction="none"), mask),
        }
        return losses, {"a": (pa.detach().sigmoid(), ya), "b": (pb.detach()[mask], yb[mask])}


def test_a_partially_labelled_task_takes_the_kpi_of_its_labelled_samples():
    net, record = MaskedKPINet(), KPIRecorder()
    trainer(max_steps=1, callbacks=[DTP(alpha=1.0), record]).fit(net, loader(make_data(n=16), 16))
    assert record.averages[0]["b"] == pytest.approx(net.labelled_kpi[0], abs=1e-7)
    assert 0 < net.labelled_kpi[0] < 1


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_lower_kpi_gets_a_higher_weight_and_kpi_one_gets_zero(gamma):
    k = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    w = dtp_focal_weight(k, gamma)
    assert bool((w[1:] <= w[:-1]).all())  # non-increasing in κ (constant on the clamped ends)
    inner = (k > DTP_EPS) & (k < 1 - DTP_EPS)
    assert bool((w[inner][1:] < w[inner][:-1]).all())  # strictly decreasing inside
    assert float(w.max()) == pytest.approx(focal_weight_bound(gamma))
    near_one = dtp_focal_weight(torch.tensor([0.999999], dtype=torch.float64), gamma, eps=1e-7)
    assert float(near_one) < 1e-5  # κ -> 1: weight -> 0
    assert bool((w >= 0).all())


def test_weights_are_permutation_equivariant_and_larger_gamma_focuses_harder():
    g = torch.Generator().manual_seed(0)
    k = torch.rand(5, generator=g, dtype=torch.float64) * 0.9 + 0.05
    perm = torch.randperm(5, generator=g)
    torch.testing.assert_close(dtp_weights(k[perm]), dtp_weights(k)[perm])
    # a larger γ shrinks the weight of a good task relative to a bad one: w(0.2)/w(0.8) grows with γ
    ratios = []
    for gamma in (0.0, 1.0, 2.0, 4.0):
        w = dtp_focal_weight(torch.tensor([0.2, 0.8], dtype=torch.float64), gamma)
        ratios.append(float(w[0] / w[1]))
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1]


# ------------------------------------------------------------------------------------------ the per-batch KPI
def test_kpi_is_the_metric_on_the_batch_alone():
    # α = 1: the average is the last batch's KPI; it must equal the batch accuracy computed by hand (not the
    # epoch's running accuracy), for a collection member that shares its state (compute groups): recall
    collection = MetricCollection(
        {
            "precision": MulticlassPrecision(num_classes=3, average="micro"),
            "recall": MulticlassRecall(num_classes=3, average="micro"),
            "acc": MulticlassAccuracy(num_classes=3, average="micro"),
        }
    )
    net = KPINet(tasks=kpi_tasks(b_metrics=collection))
    recorder = KPIRecorder()
    trainer(max_epochs=2, callbacks=[DTP(kpi={"b": "recall"}, alpha=1.0), recorder]).fit(
        net, loader(make_data(n=48), batch_size=16)
    )
    assert len(recorder.averages) == len(net.batch_kpi) == 6
    for seen, expected in zip(recorder.averages, net.batch_kpi):
        assert [seen["a"], seen["b"]] == pytest.approx(expected, abs=1e-6)
    assert len({tuple(e) for e in net.batch_kpi}) > 1  # the batches differ: a running value would not match


def test_kpi_with_concatenated_states_is_the_metric_on_the_batch_alone():
    net, recorder = KPINet(tasks=auroc_tasks()), KPIRecorder()
    trainer(max_epochs=1, callbacks=[DTP(alpha=1.0), recorder]).fit(
        net, loader(make_data(n=48), batch_size=16)
    )
    expected = [float(binary_auroc(p, t)) for p, t in net.batch_outputs]
    assert [r["a"] for r in recorder.averages] == pytest.approx(expected, abs=1e-6)
    assert len(set(expected)) > 1


def test_a_mapped_lower_is_better_metric_is_a_kpi():
    # 1 − Hamming distance is the accuracy: torchmetrics metric arithmetic maps an error into a KPI
    tasks = kpi_tasks(b_metrics=None)
    tasks[0] = Task(
        "a",
        metrics={"kpi": 1 - BinaryHammingDistance(), "acc": BinaryAccuracy()},
        higher_is_better={"kpi": True},
    )
    net, recorder = KPINet(tasks=tasks), KPIRecorder()
    trainer(max_epochs=1, callbacks=[DTP(kpi={"a": "kpi"}, alpha=1.0), recorder]).fit(
        net, loader(make_data(n=48), batch_size=16)
    )
    assert [r["a"] for r in recorder.averages] == pytest.approx([e[0] for e in net.batch_kpi], abs=1e-6)


# ------------------------------------------------------------------------------------------ errors
class _Ratio(Metric):
    """Sum of preds / count: a (mis)declared 'KPI' that can leave [0, 1]."""

    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds, target) -> None:
        self.total += preds.sum()
        self.n += preds.numel()

    def compute(self):
        return self.total / self.n


def _fit_error(tasks, strategy, match):
    with pytest.raises(ValueError, match=match):
        trainer(max_steps=1, callbacks=[strategy]).fit(KPINet(tasks=tasks), loader(make_data(n=16)))


def test_task_without_metrics_is_an_error():
    _fit_error(
        [Task("a", metrics={"acc": BinaryAccuracy()}), Task("b")], DTP(), r"task 'b' declares no metrics.*KPI"
    )


def test_unknown_metric_name_is_an_error():
    _fit_error(kpi_tasks(), DTP(kpi={"b": "iou"}), r"metric 'iou' for task 'b'.*its metrics are \['acc'\]")


def test_several_metrics_need_a_named_kpi():
    both = {"acc": MulticlassAccuracy(num_classes=3), "rec": MulticlassRecall(num_classes=3)}
    _fit_error(
        kpi_tasks(b_metrics=both), DTP(), r"task 'b' has 2 metrics \['acc', 'rec'\].*kpi=\{'b': 'acc'\}"
    )


def test_kpi_for_an_unknown_task_is_an_error():
    _fit_error(kpi_tasks(), DTP(kpi={"c": "acc"}), r"unknown task\(s\) \['c'\]")


def test_lower_is_better_metric_is_not_a_kpi():
    _fit_error(
        kpi_tasks(b_metrics={"mae": MeanAbsoluteError()}),
        DTP(),
        r"'mae' of task 'b'.*lower-is-better.*Map it",
    )


def test_metric_not_readable_per_batch_is_an_error():
    _fit_error(
        kpi_tasks(b_metrics={"r": PearsonCorrCoef()}, higher_is_better={"r": True}),
        DTP(),
        r"task 'b', metric 'r' \(PearsonCorrCoef\).*state 'mean_x'.*reduced by None",
    )


def test_kpi_outside_zero_one_is_an_error():
    # b's preds are logits: their mean is not in [0, 1] in general; force it with a shift
    class Shifted(KPINet):
        def task_losses(self, batch, batch_idx):
            losses, outputs = super().task_losses(batch, batch_idx)
            return losses, {"a": outputs["a"], "b": (outputs["b"][1].float() + 2.0, outputs["b"][1])}

    tasks = kpi_tasks(b_metrics={"ratio": _Ratio()})
    with pytest.raises(
        ValueError,
        match=r"KPI of task 'b' \(metric 'ratio'\) is \d\.\d+ on this training batch, outside \[0, 1\]",
    ):
        trainer(max_steps=1, callbacks=[DTP()]).fit(Shifted(tasks=tasks), loader(make_data(n=16)))


def test_non_scalar_kpi_is_an_error():
    per_class = {"acc": MulticlassAccuracy(num_classes=3, average=None)}
    with pytest.raises(ValueError, match=r"KPI of task 'b' \(metric 'acc'\) returned \(3,\), not one number"):
        trainer(max_steps=1, callbacks=[DTP()]).fit(
            KPINet(tasks=kpi_tasks(b_metrics=per_class)), loader(make_data(n=16))
        )


def test_gamma_per_task_must_name_every_task():
    _fit_error(
        kpi_tasks(), DTP(gamma={"a": 1.0}), r"gamma=\{'a': 1\.0\} must name every task.*missing \['b'\]"
    )
    _fit_error(kpi_tasks(), DTP(gamma={"a": 1.0, "b": 1.0, "z": 2.0}), r"unknown \['z'\]")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(alpha=0.0), r"alpha must be in \(0, 1\], got 0\.0"),
        (dict(alpha=1.5), r"alpha.*1\.5"),
        (dict(alpha=math.nan), r"alpha.*nan"),
        (dict(alpha=True), r"alpha.*True"),
        (dict(gamma=-1.0), r"gamma must be >= 0.*-1\.0"),
        (dict(gamma={"a": math.inf}), r"gamma\['a'\].*inf"),
        (dict(eps=0.0), r"eps must be in \(0, 0\.5\), got 0\.0"),
        (dict(eps=0.5), r"eps.*0\.5"),
        (dict(kpi={"a": 3}), r"kpi must map task names to metric names"),
        (dict(kpi=["a"]), r"kpi must map"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DTP(**kwargs)


def test_nan_kpi_keeps_the_average_with_one_warning():
    s = bound_dtp(alpha=0.5)
    s.step_weights(torch.tensor([0.4, 0.6]))
    with pytest.warns(UserWarning, match=r"KPI of task 'b' \(metric 'acc'\) is NaN"):
        kpi = s._checked(torch.tensor([0.8, math.nan], dtype=torch.float64))
    s.step_weights(kpi)
    assert s.kpi_average == pytest.approx({"a": 0.6, "b": 0.6})


# ------------------------------------------------------------------------------------------ fits
def test_fit_trains_and_prioritises_the_lagging_task():
    ds = make_data(n=96)
    net, strategy, before_step = KPINet(lr=0.05, optimizer="adam"), DTP(alpha=0.3), AverageBeforeStep()
    loss_before = _total_loss(net, ds)
    trainer(max_epochs=6, callbacks=[strategy, before_step]).fit(net, loader(ds, batch_size=16))
    assert _total_loss(net, ds) < 0.8 * loss_before
    # the last step's weights are the focal weights of the average before that step
    previous, w = before_step.last, strategy.weights
    assert w == pytest.approx({t: fl(k, 2.0) for t, k in previous.items()}, rel=1e-6)
    worse, better = sorted(previous, key=previous.get)
    assert previous[worse] < previous[better] and w[worse] > w[better]


class AverageBeforeStep(Callback):
    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        average = pl_module.strategy.kpi_average
        self.last = {} if average is None else dict(average)


def _total_loss(net: KPINet, ds) -> float:
    with torch.no_grad():
        losses, _ = net.task_losses(ds.tensors, 0)
    return float(sum(losses.values()))


def test_accumulation_updates_per_micro_batch_and_trains():
    ds = make_data(n=64)
    net, strategy = KPINet(lr=0.05, accumulate_grad_batches=2), DTP()
    before = flat_params(net)
    trainer(max_epochs=2, callbacks=[strategy]).fit(net, loader(ds, batch_size=8))
    assert strategy._count == 16  # 8 micro-batches per epoch
    assert not torch.equal(flat_params(net), before)


def test_bf16_mixed_trains():
    ds = make_data(n=64)
    net, strategy = KPINet(lr=0.05, optimizer="adam"), DTP()
    before = _total_loss(net, ds)
    trainer(max_epochs=4, precision="bf16-mixed", callbacks=[strategy]).fit(net, loader(ds, batch_size=16))
    assert _total_loss(net, ds) < before
    assert all(0 < w < focal_weight_bound(2.0) for w in strategy.weights.values())


def test_fp16_with_a_scaler_trains():
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    ds = make_data(n=64)
    net, strategy = KPINet(lr=0.05, optimizer="adam"), DTP()
    before = _total_loss(net, ds)
    trainer(max_epochs=4, plugins=[plugin], callbacks=[strategy]).fit(net, loader(ds, batch_size=16))
    assert _total_loss(net, ds) < before


# ------------------------------------------------------------------------------------------ state
def test_state_is_restored_by_task_name():
    s = bound_dtp(("a", "b", "c"), alpha=0.5)
    for kpi in ([0.2, 0.5, 0.9], [0.4, 0.5, 0.7]):
        s.step_weights(torch.tensor(kpi))
    other = bound_dtp(("c", "a", "b"), alpha=0.5)
    other.load_state_dict(s.state_dict())
    assert other._count == 2
    torch.testing.assert_close(other._kpi_ema, s._kpi_ema[[2, 0, 1]])
    nxt = torch.tensor([0.1, 0.3, 0.8])
    torch.testing.assert_close(other.step_weights(nxt[[2, 0, 1]]), s.step_weights(nxt)[[2, 0, 1]])


def test_resume_with_another_kpi_metric_is_an_error(tmp_path):
    both = {"acc": MulticlassAccuracy(num_classes=3), "rec": MulticlassRecall(num_classes=3, average="micro")}
    ds = loader(make_data(n=32), batch_size=16)
    t = trainer(max_epochs=1, callbacks=[DTP(kpi={"b": "acc"})])
    t.fit(KPINet(tasks=kpi_tasks(b_metrics=both)), ds)
    t.save_checkpoint(tmp_path / "acc.ckpt")
    with pytest.raises(
        ValueError, match=r"kpi: saved \{'a': 'acc', 'b': 'acc'\}, current \{'a': 'acc', 'b': 'rec'\}"
    ):
        trainer(max_epochs=2, callbacks=[DTP(kpi={"b": "rec"})]).fit(
            KPINet(tasks=kpi_tasks(b_metrics=both)), ds, ckpt_path=tmp_path / "acc.ckpt"
        )


def test_resume_matches_uninterrupted(tmp_path):
    data = loader(make_data(n=48), batch_size=12)

    straight, s_straight = KPINet(optimizer="adam", lr=0.02), DTP(alpha=0.5)
    trainer(max_epochs=4, callbacks=[s_straight]).fit(straight, data)

    t1 = trainer(max_epochs=2, callbacks=[DTP(alpha=0.5)])
    t1.fit(KPINet(optimizer="adam", lr=0.02), data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = KPINet(optimizer="adam", lr=0.02), DTP(alpha=0.5)
    trainer(max_epochs=4, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")

    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    assert s_resumed._count == s_straight._count == 16
    assert s_resumed.weights == pytest.approx(s_straight.weights, abs=1e-6)
    assert s_resumed.kpi_average == pytest.approx(s_straight.kpi_average, abs=1e-9)


def test_mid_epoch_resume_by_steps(tmp_path):
    # every batch is the same 8 examples: Lightning restarts a non-resumable loader's epoch on resume, so only
    # then does the resumed run see the batches the uninterrupted one sees
    x, y = make_data(n=8).tensors
    data = loader(TensorDataset(x.repeat(8, 1), y.repeat(8, 1)), batch_size=8)

    def run(max_steps, ckpt=None):
        net, strategy = KPINet(lr=0.05), DTP(alpha=0.4)
        t = trainer(max_epochs=-1, max_steps=max_steps, callbacks=[strategy])
        t.fit(net, data, ckpt_path=ckpt)
        return t, net, strategy

    _, straight, s_straight = run(12)
    t_half, _, _ = run(5)  # mid-epoch (8 batches per epoch)
    t_half.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed, s_resumed = run(12, tmp_path / "mid.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    assert s_resumed.weights == pytest.approx(s_straight.weights, abs=1e-6)


# ------------------------------------------------------------------------------------------ DDP
def auroc_tasks() -> list[Task]:
    """Task a's KPI has concatenated states (gathered by torchmetrics under DDP), b's summed ones (all-reduced)."""
    tasks = kpi_tasks()
    tasks[0] = Task("a", kind="classification", metrics={"auroc": BinaryAUROC()})
    return tasks


class GroupedKPINet(KPINet):
    """KPINet's tasks a (AUROC: concatenated states) and b (multiclass accuracy: summed, computed alone), and
    three binary tasks whose KPIs are computed together by class: c and e (accuracy, one group), d (F1)."""

    def __init__(self, lr: float = 0.1) -> None:
        extra = [
            Task("c", metrics={"acc": BinaryAccuracy()}),
            Task("d", metrics={"f1": BinaryF1Score()}),
            Task("e", metrics={"acc": BinaryAccuracy(threshold=0.3)}),
        ]
        super().__init__(lr=lr, tasks=auroc_tasks() + extra)
        torch.manual_seed(1)
        self.extra = nn.ModuleDict({n: nn.Linear(8, 1) for n in "cde"})
        self.extra_outputs: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def task_losses(self, batch, batch_idx):
        losses, outputs = super().task_losses(batch, batch_idx)
        x, y = batch
        z = self.encoder(x)
        for i, n in enumerate("cde"):
            logits = self.extra[n](z).squeeze(1)
            target = (y[:, i % 3] * (1 if n != "e" else -1) > 0).long()
            losses[n] = nn.functional.binary_cross_entropy_with_logits(logits, target.float())
            outputs[n] = (logits.detach().sigmoid(), target)
        if torch.is_grad_enabled():
            self.extra_outputs.append({n: outputs[n] for n in "cde"})
        return losses, outputs


def test_binary_kpis_of_one_class_are_computed_together_and_equal_each_metric_alone():
    net, recorder, dtp = GroupedKPINet(), KPIRecorder(), DTP(alpha=1.0)
    trainer(max_epochs=1, callbacks=[dtp, recorder]).fit(net, loader(make_data(n=48), batch_size=16))
    groups = sorted(group.index.tolist() for group in dtp._reader._groups)
    assert groups == [[2, 4], [3]]  # c and e (accuracy; the threshold is the update's, not compute's), d (F1)
    assert [p is None for p in dtp._reader._probes] == [False, False, True, True, True]
    reference = {
        "c": binary_accuracy,
        "d": binary_f1_score,
        "e": lambda p, t: binary_accuracy(p, t, threshold=0.3),
    }
    assert len(recorder.averages) == len(net.extra_outputs) == 3
    for seen, outputs in zip(recorder.averages, net.extra_outputs):
        for n, (preds, target) in outputs.items():
            assert seen[n] == pytest.approx(float(reference[n](preds, target)), abs=1e-7), n
    assert len({tuple(r.values()) for r in recorder.averages}) > 1


@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    # every way of reading a KPI: gathered (AUROC), summed alone (multiclass accuracy), summed together (c, d, e)
    single, rank0, rank1 = ddp_parity_records(
        tmp_path,
        lambda: DTP(alpha=0.5),
        epochs=3,
        model=GroupedKPINet,
        tag="dtp",
    )
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    torch.testing.assert_close(
        rank0["state"]["state"]["kpi_ema"], rank1["state"]["state"]["kpi_ema"], atol=0, rtol=0
    )
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        rank0["state"]["state"]["kpi_ema"], single["state"]["state"]["kpi_ema"], atol=1e-7, rtol=0
    )
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, abs=1e-5), task
    assert any(abs(w - 1) > 1e-3 for w in single["weights"].values())


def test_cli_registry_reaches_dtp_when_registered():
    from lightning_mtl.cli.registry import resolve_strategy

    try:
        cls = resolve_strategy("dtp")
    except Exception:  # not registered yet (a shared file): nothing to check
        pytest.skip("DTP is not in the CLI registry yet")
    assert cls is DTP


def test_only_elementwise_binary_kpis_are_computed_together():
    from torchmetrics.classification import BinaryFBetaScore, BinaryPrecision

    from lightning_mtl.strategies.dtp import _stack_key

    class MyAccuracy(BinaryAccuracy):  # may compute otherwise
        pass

    assert _stack_key(BinaryAccuracy()) == _stack_key(BinaryAccuracy(threshold=0.7))
    assert _stack_key(BinaryPrecision()) != _stack_key(BinaryPrecision(zero_division=1.0))
    assert _stack_key(BinaryFBetaScore(beta=2.0)) != _stack_key(BinaryFBetaScore(beta=0.5))
    for alone in (
        MyAccuracy(),
        BinaryAccuracy(multidim_average="samplewise"),
        MulticlassAccuracy(num_classes=3),
        BinaryAUROC(),
        1 - BinaryHammingDistance(),
    ):
        assert _stack_key(alone) is None, alone
