"""LogSE (Ghasemi-Naraghi et al., JUCS 2022) and ScaleInvariant (Σ log Lᵢ, DB-MTL's loss balancing):
hand-computed steps, scale invariance, the relation to uncertainty weighting and IMTL-L at their optimum,
TorchJD, bad input, DDP, mixed precision, accumulation."""

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
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_mtl.functional.log_losses import (
    logse_loss,
    logse_weights,
    scale_invariant_loss,
    scale_invariant_weights,
    uncertainty_optimal_log_variances,
)
from lightning_mtl.functional.loss_weighting import imtl_l_objective, uncertainty_objective
from lightning_mtl.functional.slaw_stch import log_loss, log_loss_weights
from lightning_mtl.strategies.imtl import IMTLL
from lightning_mtl.strategies.logse import LogSE, ScaleInvariant
from lightning_mtl.strategies.uncertainty import UncertaintyWeighting


def _losses(theta: float, k=(1.0, 2.0), t=(0.0, 3.0)) -> np.ndarray:  # ScalarNet: Lᵢ = kᵢ(θ − tᵢ)²
    return np.array([k[0] * (theta - t[0]) ** 2, k[1] * (theta - t[1]) ** 2])


def _dlosses(theta: float, k=(1.0, 2.0), t=(0.0, 3.0)) -> np.ndarray:
    return np.array([2 * k[0] * (theta - t[0]), 2 * k[1] * (theta - t[1])])


# ------------------------------------------------------------------------------------------ hand-computed
def test_hand_computed_logse_steps_on_scalar_net():
    # θ0 = 1: L = (1, 8), ∇L = (2, -8); LogSE weights 1/(2L) = (1/2, 1/16): g = 1 - 1/2 = 0.5, θ1 = 0.95.
    # θ1 = 0.95: L = (0.9025, 8.405), ∇L = (1.9, -8.2): g = 1.9/1.805 - 8.2/16.81 = 0.564835, θ2 = 0.893517.
    net, strategy = ScalarNet(lr=0.1), LogSE()
    trainer(max_steps=2, callbacks=[strategy]).fit(net, dummy_loader(2))
    assert net.theta.item() == pytest.approx(0.95 - 0.1 * (1.9 / 1.805 - 8.2 / 16.81), abs=1e-6)
    assert net.theta.item() == pytest.approx(0.893517, abs=1e-6)
    # the reported weights are the last step's effective weights 1/(2Lᵢ(θ1)), Σ wᵢLᵢ = T/2
    assert list(strategy.weights.values()) == pytest.approx([1 / 1.805, 1 / 16.81], rel=1e-6)
    # objective(): ½ Σ log Lᵢ
    value = strategy.objective(torch.tensor([0.9025, 8.405]))
    assert value.item() == pytest.approx(0.5 * math.log(0.9025 * 8.405), rel=1e-6)


def test_hand_computed_scale_invariant_steps_on_scalar_net():
    # eps = 0: weights 1/L; θ0 = 1: g = 2/1 - 8/8 = 1, θ1 = 0.9; θ1: L = (0.81, 8.82), ∇L = (1.8, -8.4):
    # g = 1.8/0.81 - 8.4/8.82 = 2.2222 - 0.95238 = 1.26984, θ2 = 0.9 - 0.126984 = 0.773016.
    net, strategy = ScalarNet(lr=0.1), ScaleInvariant(eps=0.0)
    trainer(max_steps=2, callbacks=[strategy]).fit(net, dummy_loader(2))
    assert net.theta.item() == pytest.approx(0.9 - 0.1 * (1.8 / 0.81 - 8.4 / 8.82), abs=1e-6)
    assert list(strategy.weights.values()) == pytest.approx([1 / 0.81, 1 / 8.82], rel=1e-6)
    assert strategy.objective(torch.tensor([0.81, 8.82])).item() == pytest.approx(
        math.log(0.81 * 8.82), rel=1e-6
    )
    # the default eps = 1e-8 (LibMTL's DB-MTL) moves the result by ~1e-8 relative only
    net2 = ScalarNet(lr=0.1)
    trainer(max_steps=2, callbacks=[ScaleInvariant()]).fit(net2, dummy_loader(2))
    assert net2.theta.item() == pytest.approx(net.theta.item(), abs=1e-6)


def test_hand_computed_functional_values():
    losses = torch.tensor([2.0, 0.5, 4.0], dtype=torch.float64)
    # Σ log = log(2·0.5·4) = log 4; weights 1/L = (0.5, 2, 0.25); LogSE halves both
    assert scale_invariant_loss(losses, 0.0).item() == pytest.approx(math.log(4.0))
    torch.testing.assert_close(scale_invariant_weights(losses, 0.0), torch.tensor([0.5, 2.0, 0.25]).double())
    assert logse_loss(losses).item() == pytest.approx(0.5 * math.log(4.0))
    torch.testing.assert_close(logse_weights(losses), torch.tensor([0.25, 1.0, 0.125]).double())
    # ε = 1 shifts every loss: log(3·1.5·5), weights 1/(L + 1)
    assert scale_invariant_loss(losses, 1.0).item() == pytest.approx(math.log(22.5))
    torch.testing.assert_close(
        logse_weights(losses, 1.0), torch.tensor([1 / 6, 1 / 3, 1 / 10], dtype=torch.float64)
    )
    # the same formula as STCH's warm-up objective (reused, not rewritten)
    assert scale_invariant_loss(losses, 0.0).item() == log_loss(losses).item()
    torch.testing.assert_close(scale_invariant_weights(losses, 0.0), log_loss_weights(losses))


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.3])
def test_weights_are_the_gradient_of_the_objective(seed, eps):
    g = torch.Generator().manual_seed(seed)
    losses = (torch.rand(5, generator=g, dtype=torch.float64) * 4 + 0.01).requires_grad_()
    for loss_fn, weight_fn in ((scale_invariant_loss, scale_invariant_weights), (logse_loss, logse_weights)):
        (grad,) = torch.autograd.grad(loss_fn(losses, eps), losses)
        torch.testing.assert_close(weight_fn(losses.detach(), eps), grad)
    if eps == 0.0:  # Σ wᵢLᵢ = T (ScaleInvariant), T/2 (LogSE)
        assert float(
            (scale_invariant_weights(losses.detach(), 0.0) * losses.detach()).sum()
        ) == pytest.approx(5.0)
        assert float((logse_weights(losses.detach()) * losses.detach()).sum()) == pytest.approx(2.5)


@pytest.mark.parametrize("make", [LogSE, lambda: ScaleInvariant(eps=0.0)], ids=["LogSE", "ScaleInvariant"])
@pytest.mark.parametrize("c", [1e-3, 7.0])
def test_scaling_a_task_loss_leaves_the_update_unchanged(make, c):
    # ScalarNet's task 1 with k₁ = 2c instead of 2: L₁ → c·L₁, the same trajectory (the log moves by log c)
    runs = []
    for k1 in (2.0, 2.0 * c):
        net = ScalarNet(k=(1.0, k1), lr=0.05)
        trainer(max_steps=5, callbacks=[make()]).fit(net, dummy_loader(5))
        runs.append(net.theta.item())
    assert runs[1] == pytest.approx(runs[0], rel=1e-6, abs=1e-7)
    # whereas equal weighting's update changes with the scale
    eq = []
    for k1 in (2.0, 2.0 * c):
        net = ScalarNet(k=(1.0, k1), lr=0.05)
        trainer(max_steps=1).fit(net, dummy_loader(1))
        eq.append(net.theta.item())
    assert abs(eq[1] - eq[0]) > 1e-3


def test_weights_follow_the_task_order():
    losses = torch.tensor([0.5, 2.0, 4.0])
    a, b = bound(LogSE(), "abc"), bound(LogSE(), ("c", "a", "b"))
    torch.testing.assert_close(b.compute_weights(losses[[2, 0, 1]]), a.compute_weights(losses)[[2, 0, 1]])
    assert a.state_dict()["state"] == {}  # stateless: nothing to checkpoint


# ------------------------------------------------------------------------------------------ uncertainty weighting
@pytest.mark.parametrize("seed", range(3))
def test_logse_is_uncertainty_weighting_minimised_over_its_log_variances(seed):
    """min_s Σ cᵢe^{−sᵢ}Lᵢ + ½sᵢ = ½Σ log Lᵢ + Σ ½(1 + log 2cᵢ), and by the envelope theorem the weights
    cᵢe^{−sᵢ*} = ∂/∂Lᵢ of the minimum = LogSE's 1/(2Lᵢ) — for regression (c = ½) and classification (c = 1).
    Checked numerically: s minimised by Newton's method from 0, not by the closed form."""
    g = torch.Generator().manual_seed(seed)
    losses = torch.rand(4, generator=g, dtype=torch.float64) * 5 + 0.05
    factors = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64)
    s = torch.zeros(4, dtype=torch.float64)
    for _ in range(60):  # Newton on the separable convex objective: f' = ½ − c e^{−s} L, f'' = c e^{−s} L
        curv = factors * torch.exp(-s) * losses
        s = s - (0.5 - curv) / curv.clamp_min(0.05)
    torch.testing.assert_close(s, uncertainty_optimal_log_variances(losses, factors))
    torch.testing.assert_close(s[:2], torch.log(losses[:2]))  # regression: σᵢ² = Lᵢ
    value = uncertainty_objective(losses, s, factors)
    const = (0.5 * (1 + torch.log(2 * factors))).sum()
    assert value.item() == pytest.approx((logse_loss(losses) + const).item(), rel=1e-10)
    # envelope theorem: the gradient of the profile in L is UW's weights at s*
    x = losses.clone().requires_grad_()
    (grad,) = torch.autograd.grad(uncertainty_objective(x, s, factors), x)
    torch.testing.assert_close(grad, logse_weights(losses))


def test_logse_step_equals_uncertainty_weighting_step_at_its_optimum():
    # ScalarNet k = (2, 0.5), t = (0, 3), θ0 = 1: L = (2, 2), ∇L = (4, -2). UncertaintyWeighting(init = log 2)
    # starts at its optimum s* = log L for both (regression) tasks: weights ½e^{−log 2} = ¼ = 1/(2L), LogSE's:
    # g = 4/4 - 2/4 = 0.5, θ1 = 1 - 0.1·0.5 = 0.95 for both.
    k, t = (2.0, 0.5), (0.0, 3.0)
    assert _losses(1.0, k, t).tolist() == [2.0, 2.0]
    runs = {}
    for name, strategy in (
        ("logse", LogSE()),
        ("uw", UncertaintyWeighting(init=math.log(2.0), optimizer="sgd", lr=0.1)),
    ):
        net = ScalarNet(k=k, targets=t, lr=0.1)
        trainer(max_steps=1, callbacks=[strategy]).fit(net, dummy_loader(1))
        runs[name] = (net.theta.item(), list(strategy.weights.values()))
    expected = 1.0 - 0.1 * float(np.sum(_dlosses(1.0, k, t) / (2 * _losses(1.0, k, t))))
    assert expected == pytest.approx(0.95)
    assert runs["logse"][0] == pytest.approx(expected, abs=1e-7)
    assert runs["uw"][0] == pytest.approx(runs["logse"][0], abs=1e-7)
    assert runs["uw"][1] == pytest.approx(runs["logse"][1], rel=1e-6)


def test_scale_invariant_step_equals_imtl_l_step_at_its_optimum():
    # IMTL-L's Σ e^{sᵢ}Lᵢ − sᵢ is minimised at e^{sᵢ} = 1/Lᵢ (DB-MTL's remark): with L = (2, 2) and init −log 2
    # its first step is ScaleInvariant's (weights 1/2), twice LogSE's.
    k, t = (2.0, 0.5), (0.0, 3.0)
    s = torch.full((2,), -math.log(2.0), dtype=torch.float64, requires_grad=True)
    (ds,) = torch.autograd.grad(imtl_l_objective(torch.tensor([2.0, 2.0], dtype=torch.float64), s), s)
    torch.testing.assert_close(ds, torch.zeros(2, dtype=torch.float64))  # it is the optimum
    thetas = []
    for strategy in (ScaleInvariant(eps=0.0), IMTLL(init=-math.log(2.0), optimizer="sgd", lr=0.1)):
        net = ScalarNet(k=k, targets=t, lr=0.1)
        trainer(max_steps=1, callbacks=[strategy]).fit(net, dummy_loader(1))
        thetas.append(net.theta.item())
    assert thetas[0] == pytest.approx(0.9, abs=1e-7)  # g = 4/2 - 2/2 = 1
    assert thetas[1] == pytest.approx(thetas[0], abs=1e-7)


# ------------------------------------------------------------------------------------------ TorchJD
def test_equals_torchjd_geometric_mean_and_uw_at_its_optimum():
    scal = pytest.importorskip("torchjd.scalarization")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        losses = (torch.rand(3, generator=g, dtype=torch.float64) * 3 + 0.05).requires_grad_()
        # Σ log L = T·log GM(L): same value, and the same gradient
        theirs = 3 * torch.log(scal.GeometricMean()(losses))
        assert scale_invariant_loss(losses.detach(), 0.0).item() == pytest.approx(theirs.item(), rel=1e-12)
        (grad,) = torch.autograd.grad(theirs, losses)
        torch.testing.assert_close(scale_invariant_weights(losses.detach(), 0.0), grad)
        # TorchJD's UW (Σ ½e^{−s}L + ½s) with its log-variances at their optimum s = log L: LogSE + T/2
        uw = scal.UW(3).double()
        with torch.no_grad():
            uw.log_var.copy_(torch.log(losses.detach()))
        value = uw(losses)
        (s_grad,) = torch.autograd.grad(value, uw.log_var, retain_graph=True)
        torch.testing.assert_close(s_grad, torch.zeros(3, dtype=torch.float64))
        assert value.item() == pytest.approx(logse_loss(losses.detach()).item() + 1.5, rel=1e-12)
        (grad,) = torch.autograd.grad(value, losses)
        torch.testing.assert_close(logse_weights(losses.detach()), grad)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("cls", [LogSE, ScaleInvariant])
@pytest.mark.parametrize("eps", [-1e-3, math.nan, math.inf, True, "0.1", None])
def test_bad_eps(cls, eps):
    with pytest.raises(ValueError, match=rf"{cls.__name__} eps.*>= 0.*{eps!r}"):
        cls(eps=eps)


def test_functional_rejects_bad_shapes_and_eps():
    with pytest.raises(ValueError, match="1-D"):
        logse_loss(torch.tensor(1.0))
    with pytest.raises(ValueError, match="eps.*-1"):
        scale_invariant_weights(torch.ones(2), -1.0)


def test_non_positive_loss_names_the_task_and_value_in_a_fit():
    net = ScalarNet(theta=0.0)  # L = (0, 18)
    with pytest.raises(
        ValueError, match=r"LogSE needs strictly positive losses.*'t0': 0\.0.*batch 0 of epoch 0"
    ):
        trainer(max_steps=1, callbacks=[LogSE()]).fit(net, dummy_loader(1))
    assert net.theta.item() == 0.0  # raised before the step
    # ScaleInvariant's default eps = 1e-8 accepts a zero loss (weight 1e8, its gradient is 0 there)
    net = ScalarNet(theta=0.0)
    trainer(max_steps=1, callbacks=[ScaleInvariant()]).fit(net, dummy_loader(1))
    assert math.isfinite(net.theta.item())


def test_loss_below_minus_eps_is_an_error():
    s = bound(ScaleInvariant(eps=0.5))
    s.compute_weights(torch.tensor([1.0, -0.4]))  # L + ε = 0.1 > 0: allowed
    with pytest.raises(ValueError, match=r"ScaleInvariant needs losses > -eps = -0\.5.*'b': -0\.5"):
        s.compute_weights(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match=r"'a': -2\.0"):
        bound(LogSE()).compute_weights(torch.tensor([-2.0, 1.0]))


class _DropsBelowZero(ScalarNet):
    """ScalarNet whose task t1 loss is 2(θ−3)² − 7: > 0 at θ = 1 (1), < 0 once θ > 1.13."""

    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        losses["t1"] = losses["t1"] - 7.0
        return losses


def test_deferred_check_raises_one_step_later_and_leaves_the_bad_task_out():
    # the CUDA path (forced here on the CPU): the losses are read at the next step, not synchronously
    strategy = ScaleInvariant(eps=0.0)
    strategy._defer = True
    net = _DropsBelowZero(theta=1.0, k=(1.0, 2.0), targets=(0.0, 3.0), lr=0.5)
    # step 0: L = (1, 1), ∇L = (2, -8): g = 2 - 8 = -6, θ1 = 4 → L₁ = 2·1 − 7 = −5 < 0
    # step 1: weight of t1 set to 0 (left out): g = 2θ/θ² = 0.5, θ2 = 3.75; step 2 raises, naming batch 1
    with pytest.raises(ValueError, match=r"'t1': -5\.0.*batch 1 of epoch 0.*one step later.*weight 0"):
        trainer(max_steps=5, callbacks=[strategy]).fit(net, dummy_loader(5))
    assert net.theta.item() == pytest.approx(3.75)
    assert strategy.weights["t1"] == 0.0


def test_deferred_check_is_flushed_at_the_end_of_the_fit():
    strategy = ScaleInvariant(eps=0.0)
    strategy._defer = True
    net = _DropsBelowZero(theta=1.0, lr=0.5)
    with pytest.raises(ValueError, match=r"'t1': -5\.0.*batch 1"):
        trainer(max_steps=2, callbacks=[strategy]).fit(net, dummy_loader(2))  # the bad step is the last


def test_deferred_check_on_good_losses_gives_the_eager_result():
    strategy = LogSE()
    strategy._defer = True
    net = ScalarNet(lr=0.1)
    trainer(max_steps=2, callbacks=[strategy]).fit(net, dummy_loader(2))
    assert net.theta.item() == pytest.approx(0.893517, abs=1e-6)  # as the eager path
    assert strategy._pending_where is None  # flushed at the end


# ------------------------------------------------------------------------------------------ fits
@pytest.mark.parametrize("make", [LogSE, ScaleInvariant], ids=["LogSE", "ScaleInvariant"])
def test_fit_trains(make):
    data = loader(make_data(n=64), batch_size=16)
    net = TinyNet(optimizer="adam", lr=0.02)
    first = [float(v) for v in net.task_losses(next(iter(data)), 0).values()]
    trainer(max_epochs=15, callbacks=[make()]).fit(net, data)
    after = [float(v) for v in net.task_losses(next(iter(data)), 0).values()]
    assert all(a < 0.5 * f for a, f in zip(after, first)), (first, after)


@pytest.mark.parametrize("make", [LogSE, ScaleInvariant], ids=["LogSE", "ScaleInvariant"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains(make, precision):
    if precision == "16-mixed":
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    else:
        kwargs = {"precision": "bf16-mixed"}
    reference = TinyNet(optimizer="adam", lr=0.02)
    trainer(max_epochs=3, callbacks=[make()]).fit(reference, loader(make_data(n=64)))
    net, strategy = TinyNet(optimizer="adam", lr=0.02), make()
    before = flat_params(net)
    trainer(max_epochs=3, callbacks=[strategy], **kwargs).fit(net, loader(make_data(n=64)))
    after = flat_params(net)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert all(math.isfinite(w) and w > 0 for w in strategy.weights.values())
    torch.testing.assert_close(after, flat_params(reference), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("make", [LogSE, lambda: ScaleInvariant(eps=0.0)], ids=["LogSE", "ScaleInvariant"])
def test_accumulation_weights_each_micro_batch_by_its_own_losses(make):
    # one optimizer step over two micro-batches of 8: ∇ = ½ Σ_m Σᵢ wᵢ(m)∇Lᵢ(m), wᵢ(m) from micro-batch m's
    # (detached) losses; checked against a hand-written autograd computation on a copy of the model
    ds = make_data(n=16)
    net = TinyNet(lr=0.1, accumulate_grad_batches=2)
    ref = TinyNet(lr=0.1)
    ref.load_state_dict(net.state_dict())
    strategy = make()
    trainer(max_steps=1, callbacks=[strategy]).fit(net, loader(ds, batch_size=8))
    assert net.trainer.global_step == 1
    scale = 0.5 if isinstance(strategy, LogSE) else 1.0
    ref.zero_grad()
    for m in range(2):
        x, y = ds.tensors[0][8 * m : 8 * m + 8], ds.tensors[1][8 * m : 8 * m + 8]
        z = ref.encoder(x)
        losses = torch.stack(
            [nn.functional.mse_loss(ref.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate("abc")]
        )
        (scale / losses.detach() * losses).sum().div(2).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    torch.testing.assert_close(flat_params(net), flat_params(ref), atol=1e-6, rtol=1e-5)


def test_resume_matches_uninterrupted(tmp_path):
    # stateless: a checkpoint holds nothing for the strategy, and resuming is exact
    data = loader(make_data(n=48), batch_size=12)
    straight = TinyNet(optimizer="adam", lr=0.01)
    trainer(max_epochs=3, callbacks=[LogSE()]).fit(straight, data)
    t1 = trainer(max_epochs=1, callbacks=[LogSE()])
    t1.fit(TinyNet(optimizer="adam", lr=0.01), data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed = TinyNet(optimizer="adam", lr=0.01)
    trainer(max_epochs=3, callbacks=[LogSE()]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "make",
    [LogSE, pytest.param(ScaleInvariant, marks=pytest.mark.ddp_extra)],  # the same log-loss path
    ids=["LogSE", "ScaleInvariant"],
)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, make):
    single, rank0, rank1 = ddp_parity_records(tmp_path, make, epochs=3, tag=make.__name__)
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, rel=1e-5), task


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_host_synchronisation_and_the_error_is_deferred():
    s = bound(ScaleInvariant(eps=0.0))
    good, bad = torch.tensor([1.0, 2.0], device="cuda"), torch.tensor([1.0, -3.0], device="cuda")
    s.compute_weights(good)  # allocates the pinned buffer, queues a check
    torch.cuda.synchronize()
    s._check_pending()  # (what the next step does first; done here so that only the step itself is watched)
    torch.cuda.set_sync_debug_mode("error")
    try:
        w = s.compute_weights(bad)  # no synchronisation: the bad loss is not seen yet
        value = s.objective(bad)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert w.device.type == "cuda" and w.cpu().tolist() == [1.0, 0.0]
    assert math.isnan(value.item())
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"'b': -3\.0.*one step later"):
        s.compute_weights(good)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_trains_and_a_bad_loss_raises():
    net = ScalarNet(lr=0.1)
    trainer(accelerator="cuda", max_steps=2, callbacks=[LogSE()]).fit(net, dummy_loader(2))
    assert net.theta.item() == pytest.approx(0.893517, abs=1e-5)
    with pytest.raises(ValueError, match=r"'t1': -5\.0.*batch 1 of epoch 0.*one step later"):
        trainer(accelerator="cuda", max_steps=5, callbacks=[ScaleInvariant(eps=0.0)]).fit(
            _DropsBelowZero(theta=1.0, lr=0.5), dummy_loader(5)
        )


# ------------------------------------------------------------------------------------------ CLI
def _exported(monkeypatch):
    """The registry reads ``lightning_mtl.strategies.__all__`` (a shared file, edited separately): export the
    two classes there for the test, as the package will."""
    from lightning_mtl import strategies

    for cls in (LogSE, ScaleInvariant):
        monkeypatch.setattr(strategies, cls.__name__, cls, raising=False)
    names = list(getattr(strategies, "__all__", []))
    monkeypatch.setattr(
        strategies, "__all__", names + [n for n in ("LogSE", "ScaleInvariant") if n not in names]
    )


def test_cli_registry_knows_them_by_name(monkeypatch):
    from lightning_mtl.cli.registry import make_strategy, resolve_strategy

    _exported(monkeypatch)
    assert resolve_strategy("logse") is LogSE
    assert resolve_strategy("scale-invariant") is ScaleInvariant
    assert isinstance(make_strategy("LogSE"), LogSE)
    assert make_strategy("ScaleInvariant").eps == 1e-8


def test_compare_runs_them_by_name(tmp_path, monkeypatch):
    from lightning_mtl.cli import main

    _exported(monkeypatch)
    out = tmp_path / "out"
    main(
        ["compare", "--strategies", "logse,scaleinvariant", "--dataset", "synthetic", "--epochs", "1"]
        + ["--baselines", "none", "--out", str(out), "--quiet"]
    )
    rows = (out / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["LogSE", "ScaleInvariant"]
