"""SLAW (Crawshaw & Košecká, arXiv:2109.08218): hand-computed steps, invariants, bound, resume, DDP, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    ScalarNet,
    TinyNet,
    bound,
    ddp_parity_records,
    dummy_loader,
    flat_params,
    loader,
    make_data,
    trainer,
)

from lightning_mtl.cli.registry import make_strategy, resolve_strategy
from lightning_mtl.functional import cap_weights, slaw_update, slaw_weights
from lightning_mtl.strategies import SLAW


# ------------------------------------------------------------------------------------------ hand-computed
def test_hand_computed_weights_arithmetic_then_ema():
    # β = 0.5: arithmetic means for the first round(1/(1-β)) = 2 losses, then x <- 0.5 x + 0.5 v
    s = bound(SLAW(beta=0.5))
    w1 = s.compute_weights(torch.tensor([1.0, 4.0]))
    assert w1.tolist() == [1.0, 1.0]  # no update on the first loss
    w2 = s.compute_weights(torch.tensor([3.0, 4.5]))
    # a = (2, 4.25), b = ((1+9)/2, (16+20.25)/2) = (5, 18.125): var = (1, 0.0625), s = (1, 0.25)
    # w ∝ (1, 4), sum 2 -> (0.4, 1.6)
    torch.testing.assert_close(w2, torch.tensor([0.4, 1.6]), atol=1e-6, rtol=0)
    w3 = s.compute_weights(torch.tensor([2.0, 6.0]))
    a = 0.5 * np.array([2.0, 4.25]) + 0.5 * np.array([2.0, 6.0])
    b = 0.5 * np.array([5.0, 18.125]) + 0.5 * np.array([4.0, 36.0])
    inv = 1 / np.sqrt(b - a**2)  # (1/√0.5, 1/√0.796875)
    torch.testing.assert_close(w3, torch.tensor(2 * inv / inv.sum(), dtype=torch.float32), atol=1e-6, rtol=0)


def test_hand_computed_update_in_a_fit():
    # ScalarNet: θ0 = 1, L = (θ², 2(θ-3)²), lr 0.1. Step 1: weights 1 -> θ1 = 1.6.
    net = ScalarNet(lr=0.1)
    trainer(max_steps=2, max_epochs=-1, callbacks=[SLAW(beta=0.5)]).fit(net, dummy_loader(2))
    theta1 = 1.6
    l0 = np.array([1.0, 8.0])
    l1 = np.array([theta1**2, 2 * (theta1 - 3) ** 2])
    a, b = (l0 + l1) / 2, (l0**2 + l1**2) / 2
    inv = 1 / np.sqrt(b - a**2)
    w = 2 * inv / inv.sum()
    grad = w[0] * 2 * theta1 + w[1] * 4 * (theta1 - 3)
    assert net.theta.item() == pytest.approx(theta1 - 0.1 * grad, abs=1e-5)
    assert list(net.strategy.weights.values()) == pytest.approx(w.tolist(), abs=1e-6)


def test_running_moments_switch_from_arithmetic_to_ema():
    beta, n = 0.9, 10  # round(1/(1-0.9)) = 10
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(15, 3, generator=g, dtype=torch.float64) + 0.5
    a = b = None
    for k in range(15):
        a, b = slaw_update(a, b, xs[k], k + 1, beta)
        if k + 1 == n:
            torch.testing.assert_close(a, xs[:n].mean(0))
            torch.testing.assert_close(b, (xs[:n] ** 2).mean(0))
    ea, eb = xs[:n].mean(0), (xs[:n] ** 2).mean(0)
    for k in range(n, 15):
        ea, eb = beta * ea + (1 - beta) * xs[k], beta * eb + (1 - beta) * xs[k] ** 2
    torch.testing.assert_close(a, ea)
    torch.testing.assert_close(b, eb)


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("seed", range(5))
def test_weights_sum_to_T_and_order_inversely_to_the_spread(seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(4, generator=g, dtype=torch.float64) + 1
    std = torch.rand(4, generator=g, dtype=torch.float64) * 0.5 + 0.01
    w = slaw_weights(mean, mean**2 + std**2)
    assert float(w.sum()) == pytest.approx(4.0)
    assert torch.equal(torch.argsort(w), torch.argsort(std, descending=True))
    torch.testing.assert_close(w * std, (w * std)[0].expand(4))  # w ∝ 1/s


def test_eps_floors_the_std_not_the_variance():
    mean = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # var = (0, 1e-8): s = (0, 1e-4) -> (ε, 1e-4) = (1e-5, 1e-4), w ∝ (10, 1); a floor on the variance,
    # √max(var, ε), would give both √1e-5 and equal weights
    w = slaw_weights(mean, mean**2 + torch.tensor([0.0, 1e-8], dtype=torch.float64), eps=1e-5)
    torch.testing.assert_close(w, torch.tensor([20 / 11, 2 / 11], dtype=torch.float64))


def test_negative_variance_keeps_the_previous_weights():
    mean, mean_sq = torch.tensor([1.0, 2.0]), torch.tensor([0.999, 5.0])  # variance of task 0: -0.001
    assert slaw_weights(mean, mean_sq).tolist() == [1.0, 1.0]
    assert slaw_weights(mean, mean_sq, previous=torch.tensor([0.5, 1.5])).tolist() == [0.5, 1.5]
    s = bound(SLAW(beta=0.5))
    s.compute_weights(torch.tensor([1.0, 4.0]))
    w = s.compute_weights(torch.tensor([3.0, 4.5])).clone()
    s._mean_sq = s._mean**2 - 1e-9  # what rounding could leave
    s._count = 5
    torch.testing.assert_close(s.compute_weights(torch.tensor([2.0, 4.0])), w)


def test_cap_weights_hand_computed():
    # cap 1.5: 2.6 -> 1.5; the remaining 3 - 1.5 = 1.5 shared by (0.3, 0.1) in proportion: (1.125, 0.375)
    w = cap_weights(torch.tensor([2.6, 0.3, 0.1], dtype=torch.float64), 1.5)
    torch.testing.assert_close(w, torch.tensor([1.5, 1.125, 0.375], dtype=torch.float64))
    # water-filling: the redistribution may push a second weight over the cap
    w = cap_weights(torch.tensor([3.0, 0.9, 0.1], dtype=torch.float64) * (3 / 4.0), 1.2)
    assert float(w.sum()) == pytest.approx(3.0) and float(w.max()) <= 1.2 + 1e-12
    torch.testing.assert_close(w, torch.tensor([1.2, 1.2, 0.6], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"max_weight must be >= 1.*got 0\.5"):
        slaw_weights(torch.ones(3), torch.full((3,), 2.0), max_weight=0.5)


def test_max_weight_bounds_a_near_constant_loss():
    g = torch.Generator().manual_seed(1)
    free, bounded = bound(SLAW(beta=0.9), "abc"), bound(SLAW(beta=0.9, max_weight=1.5), "abc")
    for _ in range(30):
        noise = torch.randn(3, generator=g) * torch.tensor([0.0, 0.3, 0.6])  # task a is constant
        losses = torch.tensor([0.2, 1.0, 2.0]) + noise.abs()
        w_free, w_bounded = free.compute_weights(losses), bounded.compute_weights(losses)
    assert float(w_free[0]) > 2.9  # the unbounded rule gives the constant task almost all of T = 3
    assert float(w_bounded[0]) == pytest.approx(1.5, abs=1e-6)
    assert float(w_bounded.sum()) == pytest.approx(3.0, abs=1e-5)
    assert float(w_bounded[1]) > float(w_bounded[2])  # the order of the others is kept
    ratio = float(w_free[1] / w_free[2])
    assert float(w_bounded[1] / w_bounded[2]) == pytest.approx(ratio, rel=1e-4)


# ------------------------------------------------------------------------------------------ state
def test_state_is_restored_by_task_name():
    s = bound(SLAW(beta=0.5), "abc")
    for losses in ([1.0, 2.0, 3.0], [1.5, 2.2, 2.0], [0.9, 2.1, 4.0]):
        s.compute_weights(torch.tensor(losses))
    saved = s.state_dict()
    other = bound(SLAW(beta=0.5), ("c", "a", "b"))
    other.load_state_dict(saved)
    assert other._count == 3
    torch.testing.assert_close(other._mean, s._mean[[2, 0, 1]])
    nxt = torch.tensor([1.1, 2.3, 3.3])
    torch.testing.assert_close(other.compute_weights(nxt[[2, 0, 1]]), s.compute_weights(nxt)[[2, 0, 1]])


def test_resume_matches_uninterrupted(tmp_path):
    # 4 steps per epoch; β = 0.9 switches to the EMA after 10 steps, i.e. after the resume at step 8
    data = loader(make_data(n=48), batch_size=12)

    straight, s_straight = TinyNet(optimizer="adam", lr=0.01), SLAW(beta=0.9)
    trainer(max_epochs=4, callbacks=[s_straight]).fit(straight, data)

    t1 = trainer(max_epochs=2, callbacks=[SLAW(beta=0.9)])
    t1.fit(TinyNet(optimizer="adam", lr=0.01), data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = TinyNet(optimizer="adam", lr=0.01), SLAW(beta=0.9)
    trainer(max_epochs=4, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")

    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    assert s_resumed._count == s_straight._count == 16
    assert s_resumed.weights == pytest.approx(s_straight.weights, abs=1e-6)
    assert any(abs(w - 1) > 1e-3 for w in s_straight.weights.values())


def test_mid_epoch_resume_by_steps(tmp_path):
    def run(max_steps, ckpt=None):
        net, strategy = ScalarNet(lr=0.01), SLAW(beta=0.8)
        t = trainer(max_epochs=-1, max_steps=max_steps, callbacks=[strategy])
        t.fit(net, dummy_loader(4), ckpt_path=ckpt)
        return t, net, strategy

    _, straight, s_straight = run(10)
    t_half, _, _ = run(3)  # mid-epoch, during the arithmetic-mean phase (5 steps)
    t_half.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed, s_resumed = run(10, tmp_path / "mid.ckpt")
    assert resumed.theta.item() == pytest.approx(straight.theta.item(), abs=1e-6)
    assert s_resumed.weights == pytest.approx(s_straight.weights, abs=1e-6)


def test_accumulation_updates_statistics_per_micro_batch():
    net = ScalarNet(lr=0.01, accumulate_grad_batches=2)
    strategy = SLAW(beta=0.5)
    trainer(max_epochs=1, callbacks=[strategy]).fit(net, dummy_loader(6))
    assert strategy._count == 6


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    single, rank0, rank1 = ddp_parity_records(tmp_path, lambda: SLAW(beta=0.5), epochs=3, tag="slaw")
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, abs=1e-5), task
    assert any(abs(w - 1) > 1e-3 for w in single["weights"].values())


# ------------------------------------------------------------------------------------------ errors, CLI
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(beta=1.0), "beta.*1.0"),
        (dict(beta=-0.1), "beta.*-0.1"),
        (dict(beta=math.nan), "beta.*nan"),
        (dict(eps=0.0), "eps.*0.0"),
        (dict(max_weight=0.5), "max_weight.*>= 1.*0.5"),
        (dict(max_weight=math.inf), "max_weight.*inf"),
        (dict(beta=True), "beta.*True"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SLAW(**kwargs)


def test_non_finite_loss_is_stopped_by_the_module_before_slaw():
    # SLAW itself never synchronises with the host; the module's nonfinite policy names the task first
    with pytest.raises(Exception, match="t0") as err:
        trainer(max_steps=1, callbacks=[SLAW()]).fit(ScalarNet(theta=math.nan), dummy_loader(1))
    assert "nan" in str(err.value).lower()


def test_cli_registry_knows_slaw():
    assert resolve_strategy("slaw") is SLAW
    assert isinstance(make_strategy("SLAW"), SLAW)


@pytest.mark.parametrize("seed", range(20))
def test_cap_weights_equals_iterative_water_filling(seed):
    g = torch.Generator().manual_seed(seed)
    t = int(torch.randint(2, 8, (1,), generator=g))
    raw = torch.rand(t, generator=g, dtype=torch.float64) ** 4 + 1e-3
    raw = raw * (t / raw.sum())
    cap = 1.0 + float(torch.rand(1, generator=g)) * (t - 1) / 2
    # reference: cap what exceeds, spread the rest over the others in proportion, repeat until stable
    w, capped = raw.clone(), torch.zeros(t, dtype=torch.bool)
    while bool((w > cap + 1e-12).any()):
        capped |= w > cap + 1e-12
        rest = raw.masked_fill(capped, 0.0)
        w = torch.where(capped, torch.full_like(w, cap), rest * ((t - cap * int(capped.sum())) / rest.sum()))
    torch.testing.assert_close(cap_weights(raw, cap), w)
    assert float(cap_weights(raw, cap).sum()) == pytest.approx(t)
