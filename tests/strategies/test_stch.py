"""STCH (Lin et al., ICML 2024, arXiv:2402.19078): hand-computed steps, invariants, TorchJD, resume, DDP."""

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
from lightning_mtl.functional import log_loss, log_loss_weights, stch_loss, stch_weights
from lightning_mtl.strategies import STCH


def _losses(theta: float) -> np.ndarray:  # ScalarNet: L = (θ², 2(θ-3)²)
    return np.array([theta**2, 2 * (theta - 3) ** 2])


def _dlosses(theta: float) -> np.ndarray:
    return np.array([2 * theta, 4 * (theta - 3)])


# ------------------------------------------------------------------------------------------ hand-computed
def test_hand_computed_warmup_nadir_and_stch_steps():
    # warmup_epochs=1, 2 steps per epoch: epoch 0 minimises Σ log Lᵢ and its mean losses are the nadir;
    # epoch 1 minimises T·μ·log Σ exp(log(Lᵢ/nᵢ)/μ). lr 0.1, μ = 0.5.
    net, strategy = ScalarNet(lr=0.1), STCH(mu=0.5, warmup_epochs=1)
    trainer(max_epochs=2, callbacks=[strategy]).fit(net, dummy_loader(2))
    lr, mu, theta = 0.1, 0.5, 1.0
    seen = []
    for _ in range(2):  # warm-up: ∂/∂θ Σ log Lᵢ = Σ Lᵢ'/Lᵢ
        seen.append(_losses(theta))
        theta -= lr * float(np.sum(_dlosses(theta) / _losses(theta)))
    assert theta == pytest.approx(1 - 0.1 * 1 - 0.1 * (2 / 0.9 + 2 / (0.9 - 3)))  # θ1 = 0.9 by hand
    nadir = np.mean(seen, axis=0)
    for _ in range(2):
        ell = np.log(_losses(theta) / nadir)
        soft = np.exp(ell / mu) / np.exp(ell / mu).sum()
        w = 2 * soft / _losses(theta)
        theta -= lr * float(np.sum(w * _dlosses(theta)))
    assert net.theta.item() == pytest.approx(theta, abs=1e-5)
    torch.testing.assert_close(
        strategy._nadir, torch.tensor(nadir, dtype=torch.float64), atol=1e-6, rtol=1e-6
    )
    # the reported weights are the last step's effective weights, and objective() the scalarisation
    theta_last = theta + lr * float(np.sum(w * _dlosses(theta)))  # undo the last step to get its input
    assert list(strategy.weights.values()) == pytest.approx(w.tolist(), rel=1e-5)
    ell = np.log(_losses(theta_last) / nadir)
    expected = 2 * mu * np.log(np.exp(ell / mu).sum())
    value = strategy.objective(torch.tensor(_losses(theta_last), dtype=torch.float32))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_hand_computed_functional_values():
    losses, nadir = (
        torch.tensor([2.0, 1.0], dtype=torch.float64),
        torch.tensor([1.0, 2.0], dtype=torch.float64),
    )
    # ℓ = (log 2, -log 2); μ = 1: 2·log(2 + 1/2) = 2·log 2.5; softmax = (0.8, 0.2); w = 2·(0.8/2, 0.2/1)
    assert stch_loss(losses, nadir, 1.0).item() == pytest.approx(2 * math.log(2.5))
    torch.testing.assert_close(
        stch_weights(losses, nadir, 1.0), torch.tensor([0.8, 0.4], dtype=torch.float64)
    )
    # preference (1.5, 0.5) (sums to T = 2): pℓ = (1.5 log 2, -0.5 log 2)
    p = torch.tensor([1.5, 0.5], dtype=torch.float64)
    e = np.array([2**1.5, 2**-0.5])
    assert stch_loss(losses, nadir, 1.0, p).item() == pytest.approx(2 * math.log(e.sum()))
    soft = e / e.sum()
    expected = 2 * np.array([1.5 * soft[0] / 2.0, 0.5 * soft[1] / 1.0])
    torch.testing.assert_close(stch_weights(losses, nadir, 1.0, p), torch.tensor(expected))


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mu", [0.05, 1.0, 3.0])
def test_effective_weights_are_the_gradient_and_sum_T_against_the_losses(seed, mu):
    g = torch.Generator().manual_seed(seed)
    losses = (torch.rand(4, generator=g, dtype=torch.float64) * 3 + 0.05).requires_grad_()
    nadir = torch.rand(4, generator=g, dtype=torch.float64) * 3 + 0.05
    for pref in (None, torch.tensor([0.5, 1.0, 1.5, 1.0], dtype=torch.float64)):
        (grad,) = torch.autograd.grad(stch_loss(losses, nadir, mu, pref), losses)
        w = stch_weights(losses.detach(), nadir, mu, pref)
        torch.testing.assert_close(w, grad)
        if pref is None:
            assert float((w * losses.detach()).sum()) == pytest.approx(4.0)


def test_small_mu_approaches_the_tchebycheff_max():
    losses = torch.tensor([0.5, 2.0, 1.2], dtype=torch.float64)
    nadir = torch.tensor([1.0, 1.5, 0.4], dtype=torch.float64)
    ell = torch.log(losses / nadir)  # (-0.69, 0.29, 1.10): task 2 is the worst
    for mu, tol in ((1e-2, 1e-2), (1e-4, 1e-4)):
        assert stch_loss(losses, nadir, mu).item() == pytest.approx(3 * ell.max().item(), abs=3 * tol)
    w = stch_weights(losses, nadir, 1e-4)
    torch.testing.assert_close(
        w, torch.tensor([0.0, 0.0, 3 / 1.2], dtype=torch.float64), atol=1e-12, rtol=1e-9
    )
    # large μ: the objective tends to T·(μ log T + mean ℓ), the weights to 1/Lᵢ (the warm-up's)
    torch.testing.assert_close(stch_weights(losses, nadir, 1e6), 1 / losses, rtol=1e-5, atol=0)


def test_warmup_is_the_sum_of_log_losses():
    s = bound(STCH(warmup_epochs=2), "abc")
    s.on_train_batch_start(None, None, None, 0)
    losses = torch.tensor([0.3, 2.0, 5.0], requires_grad=True)
    w = s.compute_weights(losses.detach())
    (grad,) = torch.autograd.grad(torch.log(losses).sum(), losses)
    torch.testing.assert_close(w, grad)
    torch.testing.assert_close(w, log_loss_weights(losses.detach()))
    assert s.objective(losses.detach()).item() == pytest.approx(
        float(np.log([0.3, 2.0, 5.0]).sum()), rel=1e-6
    )
    assert log_loss(losses.detach()).item() == pytest.approx(float(np.log([0.3, 2.0, 5.0]).sum()), rel=1e-6)
    assert s._sum is None  # epoch 0 of 2: not the nadir epoch


def test_equals_torchjd_stch():
    torchjd = pytest.importorskip("torchjd.scalarization")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        losses = (torch.rand(3, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
        nadir = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
        pref = torch.rand(3, generator=g, dtype=torch.float64) + 0.2
        pref = pref * (3 / pref.sum())
        for mu in (0.1, 1.0):
            ell = torch.log(losses / nadir)
            # ours = T × TorchJD's STCH on the nadir-normalised log-losses with weights p, no reference
            theirs = 3 * torchjd.STCH(mu=mu, weights=pref)(ell)
            ours = stch_loss(losses, nadir, mu, pref)
            assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
            (grad,) = torch.autograd.grad(theirs, losses)
            torch.testing.assert_close(stch_weights(losses.detach(), nadir, mu, pref), grad)
            # the paper's simplex preference λ = p/T with μ' = μ/T is the same scalarisation (times T)
            paper = torchjd.STCH(mu=mu / 3, weights=pref / 3)(ell)
            assert ours.item() == pytest.approx(9 * paper.item(), rel=1e-12)


# ------------------------------------------------------------------------------------------ state, resume
def test_state_is_restored_by_task_name():
    s = bound(STCH(warmup_epochs=1, preference={"a": 1.0, "b": 2.0, "c": 3.0}), "abc")
    s.on_train_batch_start(None, None, None, 0)
    for losses in ([1.0, 2.0, 3.0], [1.5, 2.2, 2.0]):
        s.compute_weights(torch.tensor(losses))
    s.on_train_batch_start(None, None, None, 0)
    nxt = torch.tensor([1.1, 2.3, 3.3])
    w = s.compute_weights(nxt)
    other = bound(STCH(warmup_epochs=1, preference={"c": 3.0, "a": 1.0, "b": 2.0}), ("c", "a", "b"))
    other.load_state_dict(s.state_dict())
    assert other._epoch == 1 and other._count == 2
    torch.testing.assert_close(other._nadir, s._nadir[[2, 0, 1]])
    torch.testing.assert_close(other.compute_weights(nxt[[2, 0, 1]]), w[[2, 0, 1]])
    with pytest.raises(ValueError, match="warmup_epochs"):
        bound(STCH(warmup_epochs=2), "abc").load_state_dict(s.state_dict())


@pytest.mark.parametrize("k", [1, 2], ids=["resume-before-the-nadir-epoch", "resume-after-the-nadir-epoch"])
def test_resume_matches_uninterrupted(tmp_path, k):
    # warmup_epochs=2: epoch 0 log-loss, epoch 1 log-loss + nadir, epochs 2-3 STCH
    data = loader(make_data(n=48), batch_size=12)

    straight, s_straight = TinyNet(optimizer="adam", lr=0.01), STCH(mu=0.5, warmup_epochs=2)
    trainer(max_epochs=4, callbacks=[s_straight]).fit(straight, data)

    t1 = trainer(max_epochs=k, callbacks=[STCH(mu=0.5, warmup_epochs=2)])
    t1.fit(TinyNet(optimizer="adam", lr=0.01), data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = TinyNet(optimizer="adam", lr=0.01), STCH(mu=0.5, warmup_epochs=2)
    trainer(max_epochs=4, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")

    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed._nadir, s_straight._nadir, atol=1e-9, rtol=0)
    assert s_resumed._epoch == s_straight._epoch == 3 and s_straight._count == 4
    assert s_resumed.weights == pytest.approx(s_straight.weights, abs=1e-6)


def test_mid_epoch_resume_during_the_nadir_epoch(tmp_path):
    def run(max_steps, ckpt=None):
        net, strategy = ScalarNet(lr=0.01), STCH(mu=0.5, warmup_epochs=2)
        t = trainer(max_epochs=-1, max_steps=max_steps, callbacks=[strategy])
        t.fit(net, dummy_loader(4), ckpt_path=ckpt)
        return t, net, strategy

    _, straight, s_straight = run(14)
    t_half, _, s_half = run(6)  # in the middle of epoch 1, which accumulates the nadir
    assert s_half._count == 2 and s_half._nadir is None
    t_half.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed, s_resumed = run(14, tmp_path / "mid.ckpt")
    assert resumed.theta.item() == pytest.approx(straight.theta.item(), abs=1e-6)
    torch.testing.assert_close(s_resumed._nadir, s_straight._nadir, atol=1e-9, rtol=0)
    assert s_resumed.weights == pytest.approx(s_straight.weights, abs=1e-6)


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, lambda: STCH(mu=0.5, warmup_epochs=1), epochs=3, tag="stch"
    )
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, rel=1e-5), task
    nadir0, nadir1 = rank0["state"]["state"]["nadir"], single["state"]["state"]["nadir"]
    torch.testing.assert_close(nadir0, nadir1, rtol=1e-5, atol=1e-7)  # the nadir of rank-averaged losses
    assert torch.equal(nadir0, rank1["state"]["state"]["nadir"])


# ------------------------------------------------------------------------------------------ errors, CLI
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mu=0.0), "mu.*0.0"),
        (dict(mu=-1), "mu.*-1"),
        (dict(mu=math.inf), "mu.*inf"),
        (dict(warmup_epochs=0), "warmup_epochs.*0"),
        (dict(warmup_epochs=1.5), "warmup_epochs.*1.5"),
        (dict(warmup_epochs=True), "warmup_epochs.*True"),
        (dict(preference={"a": 0.0}), "preference.*'a'.*0.0"),
        (dict(preference={"a": math.nan}), "preference.*'a'.*nan"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        STCH(**kwargs)


def test_preference_must_name_every_task():
    with pytest.raises(ValueError, match=r"unknown \['z'\], missing \['b'\]"):
        bound(STCH(preference={"a": 1.0, "z": 1.0}))


def test_non_positive_loss_names_the_task_and_value():
    net = ScalarNet(theta=0.0)  # L = (0, 18)
    with pytest.raises(ValueError, match=r"STCH.*strictly positive.*'t0': 0\.0"):
        trainer(max_steps=1, callbacks=[STCH()]).fit(net, dummy_loader(1))
    s = bound(STCH())
    s.on_train_batch_start(None, None, None, 0)
    with pytest.raises(ValueError, match=r"'b': -1\.0"):
        s.compute_weights(torch.tensor([1.0, -1.0]))


def test_cli_registry_knows_stch():
    assert resolve_strategy("stch") is STCH
    assert isinstance(make_strategy("STCH"), STCH)


def test_compare_runs_slaw_and_stch_by_name(tmp_path):
    from lightning_mtl.cli import main

    out = tmp_path / "out"
    main(
        ["compare", "--strategies", "slaw,stch", "--dataset", "synthetic", "--epochs", "1"]
        + ["--baselines", "none", "--out", str(out), "--quiet"]
    )
    rows = (out / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["SLAW", "STCH"]


def test_accumulation_averages_every_micro_batch_into_the_nadir():
    net, strategy = ScalarNet(lr=0.01, accumulate_grad_batches=2), STCH(warmup_epochs=1)
    trainer(max_epochs=2, callbacks=[strategy]).fit(net, dummy_loader(4))
    assert strategy._count == 4 and strategy._epoch == 1 and strategy._nadir is not None
    assert net.trainer.global_step == 4
