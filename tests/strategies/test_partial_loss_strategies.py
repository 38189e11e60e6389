"""Partial labels (issue 9, section 1) for the loss-based strategies: an absent task has weight 0, its state is
left bit-for-bit untouched (learned parameters and their private optimizer's moments, running statistics,
epoch means, nadir), and the present tasks follow the method's rule on the present subset."""

from __future__ import annotations

import copy
import functools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import TinyNet, bound, ddp_parity_records, flat_params, loader, make_data, trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_mtl import Task, masked_mean
from lightning_mtl.functional.famo import famo_effective_weights, famo_logits_grad
from lightning_mtl.functional.loss_weighting import random_weights
from lightning_mtl.strategies._learnable import LearnableParameters
from lightning_mtl.strategies._loss_based import on_present
from lightning_mtl.strategies.dwa import DWA
from lightning_mtl.strategies.famo import FAMO
from lightning_mtl.strategies.gls import GLS
from lightning_mtl.strategies.imtl import IMTLL
from lightning_mtl.strategies.logse import LogSE, ScaleInvariant
from lightning_mtl.strategies.rlw import RLW
from lightning_mtl.strategies.slaw import SLAW
from lightning_mtl.strategies.stch import STCH
from lightning_mtl.strategies.uncertainty import UncertaintyWeighting

ABSENT_C = [True, True, False]


# ------------------------------------------------------------------------------------------ models
class EpochAbsentNet(TinyNet):
    """Tasks a, b, c (b and c partial). b is labelled where ``x[:, 0] > 0`` (uneven counts per batch); c is
    absent (``None``) during epoch ``absent_epoch`` and labelled everywhere otherwise. Adam by default, so that
    private "match" optimizers keep moments."""

    def __init__(self, absent_epoch: int = 1, optimizer: str = "adam", lr: float = 0.01, **kwargs):
        super().__init__(
            tasks=("a", Task("b", partial=True), Task("c", partial=True)),
            optimizer=optimizer,
            lr=lr,
            **kwargs,
        )
        self.absent_epoch = absent_epoch

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        out = {t: self.heads[t](z).squeeze(1) for t in self.task_names}
        losses = {
            "a": nn.functional.mse_loss(out["a"], y[:, 0]),
            "b": masked_mean((out["b"] - y[:, 1]) ** 2, x[:, 0] > 0),
            "c": nn.functional.mse_loss(out["c"], y[:, 2]),
        }
        if self.current_epoch == self.absent_epoch:
            losses["c"] = None
        return losses


class UnevenNet(TinyNet):
    """For DDP parity: task b labelled where ``x[:, 0] > 0.5`` (uneven over ranks and batches), and absent on
    every rank at every third batch (``batch_idx % 3 == 1``: the same batch index on both ranks and in the one
    process); task c labelled where ``x[:, 1] < 0``."""

    def __init__(self, **kwargs):
        super().__init__(tasks=("a", Task("b", partial=True), Task("c", partial=True)), **kwargs)

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        out = {t: self.heads[t](z).squeeze(1) for t in self.task_names}
        absent = batch_idx % 3 == 1
        # when b is absent its head is kept in the graph with a zero term (DDP without find_unused_parameters)
        keep = out["b"].sum() * 0.0 if absent else 0.0
        return {
            "a": nn.functional.mse_loss(out["a"], y[:, 0]) + keep,
            "b": None if absent else masked_mean((out["b"] - y[:, 1]) ** 2, x[:, 0] > 0.5),
            "c": masked_mean((out["c"] - y[:, 2]) ** 2, x[:, 1] < 0),
        }


class Snapshots(Callback):
    """Deep copies of ``extract(strategy)`` at the start of the given global steps (after the strategy's own
    batch-start hook), and the strategy's weights after every step."""

    def __init__(self, strategy, extract, steps):
        self.strategy, self.extract, self.steps = strategy, extract, set(steps)
        self.taken: dict[int, object] = {}
        self.weights: list[tuple[int, dict[str, float] | None]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            self.taken[trainer.global_step] = copy.deepcopy(self.extract(self.strategy))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append((trainer.current_epoch, self.strategy.weights))


def _learnable_c(learnable: LearnableParameters) -> dict[str, object]:
    """Task c's (index 2) value and every per-entry tensor of the private optimizer's state."""
    state = learnable.optimizer.state.get(learnable.param, {}) if learnable.optimizer is not None else {}
    out = {"value": learnable.param.detach()[2].clone()}
    for name, v in state.items():
        if isinstance(v, torch.Tensor) and v.shape == learnable.param.shape:
            out[name] = v[2].clone()
    return out


def _dwa_c(s: DWA):
    """Task c's epoch averages, oldest first (NaN: none yet; the layout pads with a NaN row)."""
    return [h[2].clone() for h in s._history if not math.isnan(float(h[2]))]


def _slaw_c(s: SLAW):
    count = float(s._count) if s._counts is None else float(s._counts[2])
    return {"mean": s._mean[2].clone(), "mean_sq": s._mean_sq[2].clone(), "w": s._slaw_weights[2], "n": count}


EXTRACT = {
    "UncertaintyWeighting": (lambda: UncertaintyWeighting(), lambda s: _learnable_c(s._learnable), 4),
    "IMTLL": (lambda: IMTLL(), lambda s: _learnable_c(s._scales.learnable), 4),
    "DWA": (lambda: DWA(), _dwa_c, 4),
    "SLAW": (lambda: SLAW(beta=0.5), _slaw_c, 4),
    # c is labelled in the nadir epoch (epoch 0); the nadir is set at the first step after it (step 4)
    "STCH": (lambda: STCH(warmup_epochs=1), lambda s: s._nadir[2].clone(), 5),
}


# ------------------------------------------------------------------------------------------ state untouched
@pytest.mark.parametrize("name", list(EXTRACT))
def test_an_absent_tasks_state_is_bit_for_bit_untouched_and_its_weight_is_zero(name):
    # 4 steps per epoch; c absent during epoch 1 (global steps 4..7): its state at the start of step 8 equals
    # its state at the start of step 4, bit for bit (incl. the private optimizer's Adam moments)
    make, extract, first = EXTRACT[name]
    strategy = make()
    snaps = Snapshots(strategy, extract, steps=(first, 8))
    trainer(max_epochs=3, callbacks=[strategy, snaps]).fit(EpochAbsentNet(), loader(make_data(n=64), 16))
    before, after = snaps.taken[first], snaps.taken[8]
    if isinstance(before, dict):
        assert before.keys() == after.keys() and len(before) >= 1
        for key in before:
            assert torch.equal(torch.as_tensor(before[key]), torch.as_tensor(after[key])), key
    elif isinstance(before, list):
        assert len(before) == len(after) and all(torch.equal(x, y) for x, y in zip(before, after))
    else:
        assert torch.equal(before, after)
    absent = [w for epoch, w in snaps.weights if epoch == 1]
    assert len(absent) == 4 and all(w["c"] == 0.0 for w in absent)
    assert all(w["a"] > 0 for w in absent)
    assert all(w["c"] > 0 for epoch, w in snaps.weights if epoch == 2)  # present again, trained again


def test_dwa_history_of_a_task_absent_for_a_whole_epoch_does_not_shift():
    s = DWA()
    snaps = Snapshots(s, lambda st: [h.clone() for h in st._history], steps=(8, 12))
    trainer(max_epochs=4, callbacks=[s, snaps]).fit(EpochAbsentNet(), loader(make_data(n=64), 16))
    h8, h12 = snaps.taken[8], snaps.taken[12]  # after epochs 0-1 and 0-2
    # at step 8 c has one average (epoch 0: epoch 1 left it out): NaN in the older row
    assert len(h8) == 2 and math.isnan(float(h8[0][2])) and not math.isnan(float(h8[1][2]))
    assert not math.isnan(float(h8[0][0]))  # a has two
    # at step 12 c's two averages are those of epochs 0 and 2, a's those of epochs 1 and 2
    assert float(h12[0][2]) == float(h8[1][2]) and float(h12[0][0]) == float(h8[1][0])


# ------------------------------------------------------------------------------------------ hand-computed
def test_dwa_weights_over_the_present_tasks_hand_computed():
    s = bound(DWA(temperature=2.0), "abc")
    s._history = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 2.0, 2.0])]
    w = s.compute_present_weights(torch.tensor([1.0, 0.0, 3.0]), ABSENT_C)
    # r = (0.5, 1, 0.5); over the present tasks {a, b}: 2·softmax(0.25, 0.5) = 2·(e^.25, e^.5)/(e^.25 + e^.5)
    ea, eb = math.exp(0.25), math.exp(0.5)
    torch.testing.assert_close(
        w, torch.tensor([2 * ea / (ea + eb), 2 * eb / (ea + eb), 0.0]), atol=1e-6, rtol=0
    )
    assert float(w.sum()) == pytest.approx(2.0)  # sum = the number of present tasks
    # the running sum and counts of the absent task did not move
    assert s._counts.tolist() == [1.0, 1.0, 0.0] and float(s._sum[2]) == 0.0
    # a task without two averages has r = 1; all others keep their ratio
    s2 = bound(DWA(temperature=1.0), "abc")
    s2._history = [torch.tensor([1.0, float("nan"), 4.0]), torch.tensor([2.0, 3.0, 2.0])]
    w2 = s2.compute_weights(torch.tensor([1.0, 1.0, 1.0]))
    e = np.exp([2.0, 1.0, 0.5])
    torch.testing.assert_close(w2, torch.tensor(3 * e / e.sum(), dtype=torch.float32), atol=1e-6, rtol=0)


def test_dwa_per_task_epoch_means():
    s = bound(DWA(), "abc")
    s.compute_present_weights(torch.tensor([1.0, 2.0, 0.0]), ABSENT_C)
    s.compute_weights(torch.tensor([3.0, 4.0, 5.0]))
    s._close_epoch()
    # a: (1 + 3)/2, b: (2 + 4)/2, c: 5/1 (the step where it was absent is not counted)
    assert s._history[-1].tolist() == [2.0, 3.0, 5.0]


def test_rlw_is_a_draw_over_the_present_tasks():
    for distribution in ("normal", "dirichlet"):
        s, ref = bound(RLW(distribution=distribution, seed=3), "abc"), bound(RLW(distribution, seed=3), "abc")
        s._window_start = ref._window_start = True
        w = s.compute_present_weights(torch.ones(3), ABSENT_C)
        drawn = ref.compute_weights(torch.ones(3))
        torch.testing.assert_close(
            w, torch.cat([drawn[:2] / drawn[:2].sum(), torch.zeros(1)]), atol=1e-7, rtol=0
        )
        assert float(w.sum()) == pytest.approx(1.0)
    # softmax of z restricted to the present tasks == softmax(z) renormalised over them
    z = torch.randn(3, generator=torch.Generator().manual_seed(3))
    w = random_weights(3, torch.Generator().manual_seed(3), "normal")
    torch.testing.assert_close(torch.softmax(z[:2], 0), w[:2] / w[:2].sum())


def test_rlw_draws_the_same_sequence_whatever_is_labelled():
    s, ref = bound(RLW(seed=1), "abc"), bound(RLW(seed=1), "abc")
    for step in range(4):
        s._window_start = ref._window_start = True
        present = ABSENT_C if step % 2 else [True] * 3
        w = (
            s.compute_present_weights(torch.ones(3), present)
            if step % 2
            else s.compute_weights(torch.ones(3))
        )
        full = ref.compute_weights(torch.ones(3))
        expected = on_present(lambda v: v / v.sum(), full, present if step % 2 else None)
        torch.testing.assert_close(w, expected, atol=1e-7, rtol=0)


def test_gls_geometric_mean_over_the_present_tasks_hand_computed():
    s = bound(GLS(), "abc")
    w = s.compute_present_weights(torch.tensor([1.0, 0.0, 4.0]), [True, False, True])
    # GLS over {a, c} = √(1·4) = 2; wᵢ = 2/(2·Lᵢ) = (1, 0.25); b's zero loss is not an error
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.25]))
    s._present = [True, False, True]
    assert float(s.objective(torch.tensor([1.0, 0.0, 4.0]))) == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"GLS needs strictly positive losses, got \{'a': 0.0\}"):
        s.compute_present_weights(torch.tensor([0.0, 0.0, 4.0]), [True, False, True])


@pytest.mark.parametrize(("make", "scale"), [(LogSE, 0.5), (ScaleInvariant, 1.0)])
def test_log_losses_over_the_present_tasks(make, scale):
    s = bound(make(eps=0.0), "abc")
    w = s.compute_present_weights(torch.tensor([2.0, 0.0, 4.0]), [True, False, True])  # L_b = 0: no error
    torch.testing.assert_close(w, torch.tensor([scale / 2, 0.0, scale / 4]))
    s._present = [True, False, True]
    assert float(s.objective(torch.tensor([2.0, 0.0, 4.0]))) == pytest.approx(scale * math.log(8.0))
    s._defer = True  # the deferred (CUDA) check path: the absent task's 0 never raises either
    s.compute_present_weights(torch.tensor([2.0, 0.0, 4.0]), [True, False, True])
    s.compute_present_weights(torch.tensor([2.0, 0.0, 4.0]), [True, False, True])


def test_slaw_hand_computed_with_an_absent_step():
    # β = 0.5: arithmetic means over each task's first 2 labelled losses, then x <- 0.5x + 0.5v
    s = bound(SLAW(beta=0.5), "ab")
    assert s.compute_weights(torch.tensor([1.0, 4.0])).tolist() == [1.0, 1.0]
    w = s.compute_present_weights(torch.tensor([3.0, 0.0]), [True, False])
    assert w.tolist() == [1.0, 0.0]  # one present task: its weight is P = 1; b untouched
    assert s._counts.tolist() == [2.0, 1.0] and float(s._mean[1]) == 4.0 and float(s._mean_sq[1]) == 16.0
    # a: mean (1+3)/2 = 2, mean_sq (1+9)/2 = 5
    assert float(s._mean[0]) == 2.0 and float(s._mean_sq[0]) == 5.0
    w = s.compute_weights(torch.tensor([2.0, 4.5]))
    # a: 3rd loss, EMA: a = 0.5·2 + 0.5·2 = 2, b = 0.5·5 + 0.5·4 = 4.5, var 0.5
    # b: 2nd loss, arithmetic: a = (4 + 4.5)/2 = 4.25, b = (16 + 20.25)/2 = 18.125, var 0.0625
    inv = np.array([1 / math.sqrt(0.5), 1 / math.sqrt(0.0625)])
    torch.testing.assert_close(w, torch.tensor(2 * inv / inv.sum(), dtype=torch.float32), atol=1e-6, rtol=0)


def test_slaw_present_task_with_a_single_loss_keeps_the_previous_weights():
    s = bound(SLAW(beta=0.5), "abc")
    s.compute_present_weights(torch.tensor([1.0, 2.0, 0.0]), ABSENT_C)
    w = s.compute_present_weights(torch.tensor([2.0, 4.0, 0.0]), ABSENT_C)
    # std of a's (1, 2) is 0.5, of b's (2, 4) is 1: w ∝ (2, 1), sum P = 2 -> (4/3, 2/3)
    torch.testing.assert_close(w, torch.tensor([4 / 3, 2 / 3, 0.0]), atol=1e-6, rtol=0)
    w3 = s.compute_weights(torch.tensor([2.0, 3.0, 5.0]))  # c's first loss: no spread, previous weights kept
    prev = torch.cat([w[:2], torch.ones(1)]).double()
    torch.testing.assert_close(w3.double(), prev * 3 / prev.sum(), atol=1e-6, rtol=0)


def test_stch_over_the_present_tasks_hand_computed():
    s = bound(STCH(mu=1.0, warmup_epochs=1, preference={"a": 1.0, "b": 2.0, "c": 3.0}), "abc")
    s._epoch = 0  # the last (only) warm-up epoch: weights 1/Lᵢ over the present tasks, nadir sums
    w = s.compute_present_weights(torch.tensor([2.0, 4.0, 0.0]), ABSENT_C)  # c's 0 is not checked
    torch.testing.assert_close(w, torch.tensor([0.5, 0.25, 0.0]))
    s.compute_weights(torch.tensor([4.0, 1.0, 8.0]))
    s._epoch = 1  # after the warm-up: nadir = per-task means over the labelled steps: (6/2, 5/2, 8/1)
    w = s.compute_present_weights(torch.tensor([1.5, 1.25, 0.0]), ABSENT_C)
    torch.testing.assert_close(s._nadir, torch.tensor([3.0, 2.5, 8.0], dtype=torch.float64))
    # present a, b: preference (1, 2) renormalised to sum P = 2: (2/3, 4/3); ℓ = log(L/n) = log 0.5 for both;
    # p·ℓ = (-0.4621, -0.9242); softmax = (0.6135, 0.3865); w = P·p·softmax/L = (0.5453, 0.8245)
    pref = torch.tensor([2 / 3, 4 / 3], dtype=torch.float64)
    soft = torch.softmax(pref * math.log(0.5), 0)
    by_hand = 2 * pref * soft / torch.tensor([1.5, 1.25], dtype=torch.float64)
    torch.testing.assert_close(
        by_hand, torch.tensor([0.5453, 0.8245], dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        w, torch.tensor([float(by_hand[0]), float(by_hand[1]), 0.0]), atol=1e-6, rtol=0
    )
    # the objective: P·μ·logsumexp over the present tasks
    s._present = ABSENT_C
    expected = 2 * torch.logsumexp(pref * math.log(0.5), 0)
    assert float(s.objective(torch.tensor([1.5, 1.25, 0.0]))) == pytest.approx(float(expected), abs=1e-6)


def test_stch_nadir_of_a_task_unlabelled_in_the_nadir_epoch_is_its_first_labelled_loss():
    s = bound(STCH(warmup_epochs=1), "abc")
    s._epoch = 0
    s.compute_present_weights(torch.tensor([2.0, 1.0, 0.0]), ABSENT_C)
    s._epoch = 1
    s.compute_present_weights(torch.tensor([1.0, 1.0, 0.0]), ABSENT_C)
    assert math.isnan(float(s._nadir[2]))  # not needed yet: left unknown
    with pytest.warns(UserWarning, match=r"\['c'\] were labelled in no step of the last warm-up epoch"):
        s.compute_weights(torch.tensor([1.0, 1.0, 5.0]))
    assert s._nadir.tolist() == [2.0, 1.0, 5.0]


def test_uncertainty_and_imtll_weights_are_their_rule_on_the_present_tasks():
    net, s = EpochAbsentNet(), UncertaintyWeighting()
    snaps = Snapshots(s, lambda st: st.params.detach().clone(), steps=(5,))
    trainer(max_epochs=2, max_steps=6, callbacks=[s, snaps]).fit(net, loader(make_data(n=64), 16))
    # after step 5 (epoch 1, c absent): weights ½e^{−s} for a and b, 0 for c
    p = s.params.detach()
    assert s.weights == pytest.approx({"a": 0.5 * math.exp(-p[0]), "b": 0.5 * math.exp(-p[1]), "c": 0.0})
    # the objective leaves c's term out (½s_c included)
    losses = torch.tensor([0.3, 0.2, 0.0])
    assert float(s.objective(losses)) == pytest.approx(
        float((0.5 * (-p[:2]).exp() * losses[:2] + 0.5 * p[:2]).sum())
    )
    t = IMTLL()
    trainer(max_epochs=2, max_steps=6, callbacks=[t]).fit(EpochAbsentNet(), loader(make_data(n=64), 16))
    sc = t.log_scales
    assert t.weights == pytest.approx({"a": math.exp(sc[0]), "b": math.exp(sc[1]), "c": 0.0})
    assert float(t.objective(losses)) == pytest.approx(float((sc[:2].exp() * losses[:2] - sc[:2]).sum()))


# ------------------------------------------------------------------------------------------ learnable
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_learnable_masked_step_leaves_absent_entries_and_their_moments_untouched(kind):
    learn = LearnableParameters(torch.zeros(3), kind, lr=0.1)
    learn.prepare(SimpleNamespace(optimizers=[]), torch.device("cpu"))
    if kind == "sgd":  # momentum: a per-entry buffer
        learn.optimizer = torch.optim.SGD([learn.param], lr=0.1, momentum=0.9)
    learn.accumulate(torch.tensor([1.0, 2.0, 3.0]))
    learn.step(None)
    state = copy.deepcopy(learn.optimizer.state[learn.param])
    value = learn.param.detach().clone()
    # two micro-batches of a window: c absent from both, b from the first only
    learn.accumulate(torch.tensor([1.0, 9.0, 9.0]), [True, False, False])
    learn.accumulate(torch.tensor([1.0, 1.0, 9.0]), [True, True, False])
    learn.step(None)
    assert float(learn.param[2]) == float(value[2])  # bit for bit
    assert float(learn.param[0]) != float(value[0]) and float(learn.param[1]) != float(value[1])
    for name, v in learn.optimizer.state[learn.param].items():
        if isinstance(v, torch.Tensor) and v.shape == (3,):
            assert float(v[2]) == float(state[name][2]), name
            assert float(v[1]) != float(state[name][1]), name  # b took the second micro-batch's gradient
    # a task absent from the optimizer's first step starts from the optimizer's initial (zero) state
    fresh = LearnableParameters(torch.zeros(2), "adam", lr=0.1)
    fresh.prepare(SimpleNamespace(optimizers=[]), torch.device("cpu"))
    fresh.accumulate(torch.tensor([1.0, 5.0]), [True, False])
    fresh.step(None)
    st = fresh.optimizer.state[fresh.param]
    assert (
        float(fresh.param[1]) == 0.0 and float(st["exp_avg"][1]) == 0.0 and float(st["exp_avg_sq"][1]) == 0.0
    )


# ------------------------------------------------------------------------------------------ FAMO
def test_famo_over_the_present_tasks_and_absent_logits_untouched():
    s = bound(FAMO(lr=0.1), "abc")
    module = SimpleNamespace(trainer=None)
    losses = torch.tensor([1.0, 2.0, 3.0])
    s._present = None
    s.on_post_step_losses(module, losses, torch.tensor([0.9, 1.9, 2.5]))  # a full step: every logit moves
    xi = s.logits.detach().clone()
    adam = copy.deepcopy(s._learnable.optimizer.state[s._learnable.param])
    w = s.compute_present_weights(torch.tensor([1.0, 2.0, 0.0]), ABSENT_C)
    expected = famo_effective_weights(xi[:2].double(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(w, torch.cat([expected.float(), torch.zeros(1)]), atol=1e-7, rtol=0)
    assert float(w.sum()) == pytest.approx(1.0)
    s._present = ABSENT_C  # the window's last micro-batch had c absent: its (zero) losses are not checked
    s.on_post_step_losses(module, torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.8, 1.9, 0.0]))
    state = s._learnable.optimizer.state[s._learnable.param]
    assert float(s.logits[2]) == float(xi[2])
    assert float(state["exp_avg"][2]) == float(adam["exp_avg"][2])
    assert float(state["exp_avg_sq"][2]) == float(adam["exp_avg_sq"][2])
    # the present logits took δ over the present tasks (softmax over a and b) plus their weight decay
    delta = famo_logits_grad(
        xi[:2].double(),
        torch.tensor([1.0, 2.0], dtype=torch.float64),
        torch.tensor([0.8, 1.9], dtype=torch.float64),
    )
    g = delta.float() + s.weight_decay * xi[:2]
    torch.testing.assert_close(state["exp_avg"][:2], 0.9 * adam["exp_avg"][:2] + 0.1 * g, atol=1e-7, rtol=0)


def test_famo_fit_with_an_absent_task():
    s = FAMO()
    snaps = Snapshots(s, lambda st: _learnable_c(st._learnable), steps=(4, 8))
    trainer(max_epochs=3, callbacks=[s, snaps]).fit(EpochAbsentNet(), loader(make_data(n=64), 16))
    for key, value in snaps.taken[4].items():
        assert torch.equal(value, snaps.taken[8][key]), key


# ------------------------------------------------------------------------------------------ fits, resume
ALL = {
    "UncertaintyWeighting": lambda: UncertaintyWeighting(),
    "DWA": lambda: DWA(),
    "RLW": lambda: RLW(seed=0),
    "GLS": lambda: GLS(),
    "SLAW": lambda: SLAW(),
    "STCH": lambda: STCH(warmup_epochs=1),
    "IMTLL": lambda: IMTLL(),
    "LogSE": lambda: LogSE(),
    "ScaleInvariant": lambda: ScaleInvariant(),
}


@pytest.mark.parametrize("name", list(ALL))
def test_fit_with_partial_labels_and_accumulation_trains(name):
    net = EpochAbsentNet(accumulate_grad_batches=2)
    data = loader(make_data(n=64), 8)
    x, y = data.dataset.tensors
    before = float(nn.functional.mse_loss(net.heads["a"](net.encoder(x)).squeeze(1), y[:, 0]))
    strategy = ALL[name]()
    assert strategy.supports_absent_tasks
    trainer(max_epochs=4, callbacks=[strategy]).fit(net, data)
    after = float(nn.functional.mse_loss(net.heads["a"](net.encoder(x)).squeeze(1), y[:, 0]))
    assert after < before and not math.isnan(float(flat_params(net).sum()))


@pytest.mark.parametrize("name", ["UncertaintyWeighting", "DWA", "SLAW", "STCH"])
def test_resume_after_an_absent_epoch_matches_uninterrupted(tmp_path, name):
    data = loader(make_data(n=64), 16)
    straight, s_straight = EpochAbsentNet(), ALL[name]()
    trainer(max_epochs=4, callbacks=[s_straight]).fit(straight, data)
    t1 = trainer(max_epochs=2, callbacks=[ALL[name]()])
    t1.fit(EpochAbsentNet(), data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = EpochAbsentNet(), ALL[name]()
    trainer(max_epochs=4, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    assert s_resumed.weights == pytest.approx(s_straight.weights, abs=1e-6)


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "make",
    [
        functools.partial(UncertaintyWeighting, optimizer="adam", lr=0.05),
        functools.partial(DWA, temperature=1.0),
    ],
    ids=["UncertaintyWeighting", "DWA"],
)
def test_uneven_label_counts_and_absent_steps_are_exact_under_ddp(tmp_path, make):
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, make, epochs=3, batch_size=8, model=UnevenNet, tag=make.func.__name__
    )
    torch.testing.assert_close(rank0["params"], rank1["params"], atol=0, rtol=0)
    torch.testing.assert_close(single["params"], rank0["params"], atol=1e-5, rtol=0)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, abs=1e-5), task


# ------------------------------------------------------------------------------------------ more invariants
@pytest.mark.parametrize("name", ["RLW", "GLS", "LogSE", "ScaleInvariant", "DWA", "SLAW", "STCH"])
def test_weights_of_the_absent_epoch_are_zero_for_c_and_follow_the_rule_on_the_present_tasks(name):
    strategy = ALL[name]()
    snaps = Snapshots(strategy, lambda s: None, steps=())
    trainer(max_epochs=2, callbacks=[strategy, snaps]).fit(EpochAbsentNet(), loader(make_data(n=64), 16))
    absent = [w for epoch, w in snaps.weights if epoch == 1]
    assert len(absent) == 4 and all(w["c"] == 0.0 and w["a"] > 0 and w["b"] > 0 for w in absent)
    if name == "RLW":  # a draw over the present tasks: sums to 1
        assert all(w["a"] + w["b"] == pytest.approx(1.0) for w in absent)
    if name in ("DWA", "SLAW"):  # normalised to the number of present tasks
        assert all(w["a"] + w["b"] == pytest.approx(2.0) for w in absent)


@pytest.mark.parametrize("make", [DWA, lambda: SLAW(beta=0.5), lambda: STCH(warmup_epochs=1)])
def test_per_task_counts_are_restored_by_task_name(make):
    s = bound(make(), "abc")
    if isinstance(s, STCH):
        s._epoch = 0
    s.compute_present_weights(torch.tensor([1.0, 2.0, 0.0]), ABSENT_C)
    s.compute_weights(torch.tensor([1.5, 2.5, 3.0]))
    saved = s.state_dict()
    assert saved["state"]["counts"].tolist() == [2.0, 2.0, 1.0]
    other = bound(make(), ("c", "a", "b"))
    other.load_state_dict(saved)
    assert other._counts.tolist() == [1.0, 2.0, 2.0]
    key = "_mean" if isinstance(s, SLAW) else "_sum"
    torch.testing.assert_close(getattr(other, key), getattr(s, key)[[2, 0, 1]])


@pytest.mark.parametrize("name", ["UncertaintyWeighting", "SLAW"])
def test_bf16_mixed_with_partial_labels_trains(name):
    net = EpochAbsentNet()
    data = loader(make_data(n=64), 16)
    x, y = data.dataset.tensors
    before = float(nn.functional.mse_loss(net.heads["a"](net.encoder(x)).squeeze(1), y[:, 0]))
    trainer(max_epochs=3, precision="bf16-mixed", callbacks=[ALL[name]()]).fit(net, data)
    after = float(nn.functional.mse_loss(net.heads["a"](net.encoder(x)).squeeze(1), y[:, 0]))
    assert after < before
