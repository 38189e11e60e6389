"""Partial labels: ``Task(partial=True)``, :func:`lightning_mtl.masked_mean`, exact combination over DDP ranks,
absent tasks (weight 0, state untouched), logging and evaluation over labelled samples only."""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import (
    RecordState,
    TinyNet,
    ddp_parity_records,
    flat_params,
    load_record,
    loader,
    make_data,
    restore_environ,
    trainer,
)
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl import MaskedMean, Task, masked_mean
from lightning_mtl.strategies import MGDA, EqualWeighting, NashMTL, PCGrad, UPGrad


# ------------------------------------------------------------------------------------------ masked_mean
def test_masked_mean_is_the_mean_over_labelled_entries_and_ignores_nan_outside():
    values = torch.tensor([1.0, float("nan"), 3.0, 5.0], requires_grad=True)
    m = masked_mean(values, torch.tensor([True, False, True, False]))
    assert isinstance(m, MaskedMean)
    assert float(m) == 2.0 and float(m.count) == 2.0 and float(m.total) == 4.0
    m.total.backward()
    assert values.grad.tolist() == [1.0, 0.0, 1.0, 0.0]  # no NaN leaks into the gradient
    # a mask of the leading dims: every element of a labelled sample counts
    per_pixel = torch.arange(12.0).view(3, 2, 2)
    m = masked_mean(per_pixel, torch.tensor([1, 0, 1]))
    assert float(m.count) == 8 and float(m) == pytest.approx((sum(range(4)) + sum(range(8, 12))) / 8)
    assert float(masked_mean(torch.ones(3), torch.zeros(3, dtype=torch.bool))) == 0.0  # nothing labelled
    assert float(2 * masked_mean(torch.tensor([1.0, 3.0]))) == 4.0


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.ones(4, dtype=torch.bool), r"mask of shape \(4,\) does not match values of shape \(3,\)"),
        (torch.tensor([0.5, 1.0, 0.0]), "only 0 and 1"),
        ([True, False, True], "mask must be a bool tensor"),
    ],
)
def test_masked_mean_bad_input(mask, message):
    with pytest.raises((ValueError, TypeError), match=message):
        masked_mean(torch.ones(3), mask)


# ------------------------------------------------------------------------------------------ models
class PartialNet(TinyNet):
    """TinyNet whose task ``b`` is labelled only where ``x[:, 0] > threshold`` (a per-sample mask, uneven over
    batches and ranks) and whose task ``c`` is partial and never labelled when ``drop_c``."""

    def __init__(self, threshold: float = 0.5, drop_c: bool = False, none_on_empty: bool = False, **kwargs):
        super().__init__(tasks=("a", Task("b", partial=True), Task("c", partial=True)), **kwargs)
        self.threshold, self.drop_c, self.none_on_empty = threshold, drop_c, none_on_empty

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        out = {t: self.heads[t](z).squeeze(1) for t in self.task_names}
        mask = x[:, 0] > self.threshold
        losses = {
            "a": nn.functional.mse_loss(out["a"], y[:, 0]),
            "b": masked_mean((out["b"] - y[:, 1]) ** 2, mask),
            "c": nn.functional.mse_loss(out["c"], y[:, 2]),
        }
        if self.none_on_empty and not bool(mask.any()):
            losses["b"] = None
        if self.drop_c:
            del losses["c"]
        return losses


class ManualMasked(TinyNet):
    """The single-process reference: task b's masked mean written by hand."""

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        mask = x[:, 0] > 0.5
        pred_b = self.heads["b"](z).squeeze(1)
        return {
            "a": nn.functional.mse_loss(self.heads["a"](z).squeeze(1), y[:, 0]),
            "b": ((pred_b - y[:, 1]) ** 2)[mask].mean(),
            "c": nn.functional.mse_loss(self.heads["c"](z).squeeze(1), y[:, 2]),
        }


def test_one_process_masked_mean_equals_the_hand_written_masked_loss():
    ds = make_data(n=64)
    ref, net = ManualMasked(), PartialNet()
    for model in (ref, net):
        trainer(max_epochs=2, callbacks=[PCGrad()]).fit(model, loader(ds, 16))
    torch.testing.assert_close(flat_params(net), flat_params(ref), atol=1e-6, rtol=0)


def test_an_absent_task_gets_weight_zero_and_no_update():
    net = PartialNet(drop_c=True)
    head_c = net.heads["c"].weight.detach().clone()
    strategy = MGDA()
    trainer(max_epochs=1, callbacks=[strategy]).fit(net, loader(make_data(n=64), 16))
    assert strategy.weights["c"] == 0.0 and strategy.weights["a"] > 0
    assert torch.equal(net.heads["c"].weight, head_c)  # never trained


def test_nash_state_of_an_absent_task_is_untouched():
    strategy = NashMTL()
    net = PartialNet(threshold=10.0, none_on_empty=True)  # b labelled nowhere: absent every step
    trainer(max_steps=3, callbacks=[strategy]).fit(net, loader(make_data(n=64), 16))
    assert strategy.weights["b"] == 0.0
    assert strategy._alpha is None or strategy._alpha.numel() == 3


def test_every_built_in_strategy_handles_absent_tasks():
    from lightning_mtl.cli.registry import available_strategies

    assert len(available_strategies()) >= 30
    assert sorted(n for n, cls in available_strategies().items() if not cls.supports_absent_tasks) == []


class NoAbsentTasks(EqualWeighting):
    supports_absent_tasks = False


def test_a_strategy_without_support_for_absent_tasks_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"Task\(s\) \['c'\] have no labelled sample.*NoAbsentTasks does not handle absent tasks.*EqualWeighting",
    ):
        trainer(max_steps=1, callbacks=[NoAbsentTasks()]).fit(
            PartialNet(drop_c=True), loader(make_data(n=16), 8)
        )


def test_a_missing_task_that_is_not_partial_stays_an_error():
    class Missing(PartialNet):
        def task_losses(self, batch, batch_idx):
            losses = super().task_losses(batch, batch_idx)
            del losses["a"]
            return losses

    with pytest.raises(KeyError, match=r"missing task\(s\) \['a'\]"):
        trainer(max_steps=1).fit(Missing(), loader(make_data(n=16), 8))


def test_labelled_counts_are_logged_and_validation_averages_labelled_samples_only(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    ds = make_data(n=64)
    net = PartialNet(drop_c=True)
    t = trainer(
        max_epochs=1, logger=CSVLogger(str(tmp_path)), log_every_n_steps=1, callbacks=[EqualWeighting()]
    )
    t.fit(net, loader(ds, 16), loader(ds, 16))
    import csv

    rows = list(csv.DictReader(open(os.path.join(t.logger.log_dir, "metrics.csv"))))
    x, y = ds.tensors
    first = x[:16, 0] > 0.5
    labelled = [float(r["train/labelled/b"]) for r in rows if r.get("train/labelled/b")]
    assert labelled[0] == float(first.sum())
    assert all(float(r["train/labelled/c"]) == 0.0 for r in rows if r.get("train/labelled/c"))
    # a plain loss (task a, labelled everywhere) counts the batch's samples
    assert all(float(r["train/labelled/a"]) == 16.0 for r in rows if r.get("train/labelled/a"))
    # validation: b's mean over its labelled samples of the whole set; c has none: not logged
    net.eval()
    with torch.no_grad():
        pred = net.heads["b"](net.encoder(x)).squeeze(1)
    mask = x[:, 0] > 0.5
    expected = float(((pred - y[:, 1]) ** 2)[mask].mean())
    val = [float(r["val/loss/b"]) for r in rows if r.get("val/loss/b")]
    assert val[-1] == pytest.approx(expected, rel=1e-5)
    assert not any(r.get("val/loss/c") for r in rows)


# ------------------------------------------------------------------------------------------ DDP
# PCGrad and NashMTL take the partial-label path of MGDA and UPGrad (GradientWeighting's present rows), and their
# full-label DDP cases run by default (test_gradient_ddp.py): their partial-label cases run with `make test-all`
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "make",
    [
        EqualWeighting,
        pytest.param(PCGrad, marks=pytest.mark.ddp_extra),
        MGDA,
        UPGrad,
        pytest.param(NashMTL, marks=pytest.mark.ddp_extra),
    ],
    ids=lambda c: c.__name__,
)
def test_uneven_label_counts_are_exact_under_ddp(tmp_path, make):
    # task b: mean over every labelled sample of the union batch, not the mean of the ranks' means
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, make, epochs=3, batch_size=8, model=PartialNet, tag=make.__name__
    )
    torch.testing.assert_close(rank0["params"], rank1["params"], atol=0, rtol=0)
    torch.testing.assert_close(single["params"], rank0["params"], atol=1e-5, rtol=0)


class OneRankLabels(PartialNet):
    """Task b is labelled on rank 0's batches only (``None`` on rank 1's)."""

    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        if self.trainer.global_rank == 1:
            losses["b"] = None
        return losses


class SingleFromRankZero(PartialNet):
    """The one-process equivalent: task b labelled on the samples rank 0 would hold (even positions)."""

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        out = {t: self.heads[t](z).squeeze(1) for t in self.task_names}
        mask = (x[:, 0] > self.threshold) & (torch.arange(len(x)) % 2 == 0)
        return {
            "a": nn.functional.mse_loss(out["a"], y[:, 0]),
            "b": masked_mean((out["b"] - y[:, 1]) ** 2, mask),
            "c": nn.functional.mse_loss(out["c"], y[:, 2]),
        }


@pytest.mark.timeout(300)
def test_a_task_absent_on_one_rank_only(tmp_path):
    from torch.utils.data import DistributedSampler

    ds = make_data(n=64)
    with restore_environ():
        os.environ.pop("PL_GLOBAL_SEED", None)
        out1, out2 = tmp_path / "one", tmp_path / "two"
        out1.mkdir(), out2.mkdir()
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
        trainer(max_epochs=2, callbacks=[PCGrad(), RecordState(str(out1))]).fit(
            SingleFromRankZero(), DataLoader(ds, batch_size=16, sampler=sampler)
        )
        # the head of b is unused on rank 1: DDP must be told
        ddp = DDPStrategy(start_method="spawn", find_unused_parameters=True)
        trainer(max_epochs=2, strategy=ddp, devices=2, callbacks=[PCGrad(), RecordState(str(out2))]).fit(
            OneRankLabels(), DataLoader(ds, batch_size=8)
        )
        single, rank0 = load_record(str(out1)), load_record(str(out2), 0)
    torch.testing.assert_close(single["params"], rank0["params"], atol=1e-5, rtol=0)
    assert not math.isnan(float(single["params"].sum()))


def test_the_partial_labels_example_trains():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "partial_labels.py"
    spec = importlib.util.spec_from_file_location("example_partial_labels", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--strategy", "PCGrad", "--epochs", "1"])
    assert set(results) == {"score", "rare", "survey"} and all(math.isfinite(v) for v in results.values())
