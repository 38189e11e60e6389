"""Faults that used to lose a run or corrupt it silently (issue 7, items 1, 3, 5): a task NaN on every batch under
``nonfinite="skip"``, a finite loss with a non-finite gradient, a loss on another device."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RecordState, ScalarNet, dummy_loader, load_record, restore_environ, trainer
from lightning.pytorch.plugins import MixedPrecision


class Faulty(ScalarNet):
    """:class:`ScalarNet` whose task ``t1`` goes wrong on the batches ``bad(batch_idx, epoch)`` selects:
    ``"loss"``: a NaN loss; ``"grad"``: a finite loss (0 added) whose gradient is NaN (``sqrt`` at 0)."""

    def __init__(self, fault: str, bad=lambda batch_idx, epoch: True, **kwargs):
        super().__init__(**kwargs)
        self.fault, self.bad = fault, bad

    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        if self.is_bad(batch_idx):
            if self.fault == "loss":
                losses["t1"] = losses["t1"] * float("nan")
            else:  # d/dθ sqrt(0·θ) = 0 · 1/(2·sqrt(0)) = 0 · inf = NaN; the value is 0
                losses["t1"] = losses["t1"] + torch.sqrt(self.theta * 0.0)
        return losses

    def is_bad(self, batch_idx: int) -> bool:
        return self.bad(batch_idx, self.current_epoch)


# ---------------------------------------------------------------- item 1: a bound on consecutive skips
@pytest.mark.timeout(120)
def test_a_task_nan_on_every_batch_stops_the_fit_naming_the_task_and_the_count():
    net = Faulty("loss", nonfinite="skip", max_consecutive_skips=3)
    with pytest.warns(UserWarning, match="skipping this optimizer step"):
        with pytest.raises(
            FloatingPointError,
            match=r"skipped 3 optimizer steps in a row \(from batch 0 to batch 2, epoch 0\).*loss of task 't1'.*"
            r"max_consecutive_skips \(now 3\)",
        ):
            trainer(max_epochs=1).fit(net, dummy_loader(10))
    assert net.skipped_steps == 3
    assert net.theta.item() == 1.0  # never stepped


@pytest.mark.timeout(120)
def test_the_bound_also_ends_a_max_steps_fit_that_would_never_return():
    net = Faulty("loss", nonfinite="skip")  # default bound: 25
    with (
        pytest.warns(UserWarning),
        pytest.raises(FloatingPointError, match=r"skipped 25 optimizer steps in a row"),
    ):
        trainer(max_steps=2, max_epochs=-1).fit(net, dummy_loader(4))


def test_intermittent_skips_do_not_reach_the_bound():
    # every other batch is NaN: each real step ends the run of skipped windows
    net = Faulty("loss", bad=lambda i, e: i % 2 == 1, nonfinite="skip", max_consecutive_skips=2)
    with pytest.warns(UserWarning):
        trainer(max_epochs=1).fit(net, dummy_loader(8))
    assert net.skipped_steps == 4


@pytest.mark.parametrize("value", [0, -1, True, 2.5, None])
def test_max_consecutive_skips_is_validated(value):
    with pytest.raises(ValueError, match=rf"max_consecutive_skips must be an int >= 1, got {value!r}"):
        ScalarNet(nonfinite="skip", max_consecutive_skips=value)


# ---------------------------------------------------------------- item 3: a finite loss with a NaN gradient
def test_a_nan_gradient_from_finite_losses_raises_naming_the_batch_and_the_parameter():
    net = Faulty("grad", bad=lambda i, e: i == 1)
    with pytest.raises(
        FloatingPointError,
        match=r"Non-finite gradient at training batch 1 \(epoch 0\).*the GRADIENT, not the loss.*'theta'.*"
        r"sqrt",
    ):
        trainer(max_epochs=1).fit(net, dummy_loader(3))
    assert math.isfinite(net.theta.item())  # the bad update was never applied


def test_a_nan_gradient_in_an_accumulation_window_names_the_window():
    net = Faulty("grad", bad=lambda i, e: i == 2, accumulate_grad_batches=2)
    with pytest.raises(FloatingPointError, match=r"accumulation window ending at batch 3.*'theta'"):
        trainer(max_epochs=1).fit(net, dummy_loader(4))


def test_skip_discards_a_window_with_a_nan_gradient_and_counts_it():
    net = Faulty("grad", bad=lambda i, e: i == 1, nonfinite="skip")
    with pytest.warns(
        UserWarning, match=r"Non-finite gradient at training batch 1.*skipping this optimizer step"
    ):
        trainer(max_epochs=1).fit(net, dummy_loader(3))
    assert net.skipped_steps == 1
    # two real SGD steps from θ=1 with equal weighting: 1 -> 1.6 -> 1.6 - 0.1*(2*1.6 + 4*(1.6-3)) = 1.84
    assert net.theta.item() == pytest.approx(1.84)


def test_nan_gradients_on_every_batch_reach_the_bound_naming_the_gradient():
    net = Faulty("grad", nonfinite="skip", max_consecutive_skips=2)
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match=r"in a row.*gradient of 'theta'"):
        trainer(max_epochs=1).fit(net, dummy_loader(5))


def test_huge_but_finite_gradients_are_not_called_non_finite():
    class Huge(ScalarNet):
        def __init__(self) -> None:
            super().__init__(lr=1e-21)
            self.w = torch.nn.Parameter(torch.zeros(4))

        def task_losses(self, batch, batch_idx):
            losses = super().task_losses(batch, batch_idx)
            losses["t0"] = losses["t0"] + 1e20 * self.w.sum()  # gradient 1e20 per entry: its 2-norm overflows
            return losses

    net = Huge()
    trainer(max_epochs=1).fit(net, dummy_loader(2))
    assert torch.allclose(net.w.detach(), torch.full((4,), -0.2))


def test_under_a_grad_scaler_non_finite_gradients_are_the_scalers_business():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    net = Faulty("grad", bad=lambda i, e: i == 0)  # nonfinite="raise"
    t = trainer(max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    t.fit(net, dummy_loader(2))  # no error: the scaler skips the step and lowers its scale
    assert scaler.get_scale() < 1024.0
    assert net.skipped_steps == 0 and math.isfinite(net.theta.item())


class RankFaulty(Faulty):
    def __init__(self) -> None:
        super().__init__("grad", bad=None, nonfinite="skip")

    def is_bad(self, batch_idx: int) -> bool:
        # NaN gradient on rank 1 only (first epoch, second batch): DDP's all-reduce spreads it to every rank
        return self.global_rank == 1 and batch_idx == 1 and self.current_epoch == 0


@pytest.mark.timeout(180)
def test_under_ddp_every_rank_skips_the_same_window(tmp_path):
    with restore_environ():
        trainer(strategy="ddp_spawn", devices=2, max_epochs=2, callbacks=[RecordState(str(tmp_path))]).fit(
            RankFaulty(), dummy_loader(4)
        )
    r0, r1 = load_record(str(tmp_path), 0), load_record(str(tmp_path), 1)
    assert r0["global_step"] == r1["global_step"] == 3  # 4 batches per rank, one window skipped everywhere
    assert torch.equal(r0["params"], r1["params"]) and torch.isfinite(r0["params"]).all()


# ---------------------------------------------------------------- item 5: a loss on another device
class OtherDevice(ScalarNet):
    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        # the meta device stands in for "another device" (e.g. a CPU loss while the model is on CUDA)
        losses["t1"] = torch.zeros((), device="meta", requires_grad=True)
        return losses


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_a_loss_on_another_device_names_the_task_and_both_devices(stage):
    t = trainer(max_steps=1)
    with pytest.raises(
        RuntimeError,
        match=r"task 't1': loss on meta, but the model and the other losses are on cpu.*target.to",
    ):
        getattr(t, stage)(OtherDevice(), dummy_loader(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_fused_gradient_check_finds_nan_and_inf_and_leaves_gradients_untouched(dtype):
    from lightning_mtl.nonfinite import _all_finite

    g = torch.randn(7, dtype=dtype)
    g[0] = -0.0
    other = torch.randn(3)  # another dtype: another group
    before = g.clone()
    assert _all_finite([g, other]) and torch.equal(g, before) and g[0].item() == 0.0
    assert _all_finite([torch.full((2,), torch.finfo(dtype).max, dtype=dtype)])  # finite, however large
    for bad in (float("nan"), float("inf"), -float("inf")):
        h = g.clone()
        h[3] = bad
        assert not _all_finite([other, h])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_jacobian_finiteness_check_is_exact_when_its_sum_overflows(dtype):
    from lightning_mtl.nonfinite import tensor_finite

    big = torch.full((3, 4), torch.finfo(dtype).max, dtype=dtype)  # finite entries whose sum overflows
    assert not torch.isfinite(big.sum()) and bool(tensor_finite(big))
    assert bool(tensor_finite(torch.randn(2, 5).to(dtype)))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for base in (big, torch.randn(3, 4).to(dtype)):
            h = base.clone()
            h[1, 2] = bad
            assert not bool(tensor_finite(h))
    mixed = torch.tensor([float("inf"), -float("inf"), 1.0], dtype=dtype)  # the sum is NaN
    assert not bool(tensor_finite(mixed))
