"""ExcessMTL (He et al., ICML 2024, arXiv:2402.02009): hand-computed steps, TorchJD, invariants, state, DDP, AMP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    ConflictNet,
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

from lightning_mtl.functional.excess_mtl import (
    ExcessMTLState,
    excess_mtl_step,
    excess_risks,
    normalized_log_weights,
)
from lightning_mtl.strategies.excess_mtl import ExcessMTL

F64 = torch.float64


def _J(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ------------------------------------------------------------------------------------------ hand-computed
def test_hand_computed_two_steps_with_a_2x3_jacobian():
    eta = 0.5
    # step 1: J = [[3, 4, 0], [1, 0, 2]] -> S = J² = [[9, 16, 0], [1, 0, 4]]
    #   e_a = 9/√9 + 16/√16 + 0 = 3 + 4 = 7,  e_b = 1/√1 + 0 + 4/√4 = 1 + 2 = 3   (ε = 1e-7 negligible; 0/√ε = 0)
    #   first step: e⁰ = (7, 3) is stored and the weights stay (1, 1)
    first = excess_mtl_step(_J([[3, 4, 0], [1, 0, 2]]), robust_step_size=eta)
    torch.testing.assert_close(first.state.sq_grad_sum, _J([[9, 16, 0], [1, 0, 4]]))
    torch.testing.assert_close(first.excess, _J([7, 3]), atol=1e-6, rtol=0)
    torch.testing.assert_close(first.state.baseline, _J([7, 3]), atol=1e-6, rtol=0)
    assert first.weights.tolist() == [1.0, 1.0]
    assert first.relative_excess.tolist() == [0.0, 0.0]
    # step 2: J = [[0, 3, 0], [0, 3, 0]] -> S = [[9, 25, 0], [1, 9, 4]]
    #   e_a = 9/√25 = 1.8 -> r_a = 1.8/7 = 9/35;  e_b = 9/√9 = 3 -> r_b = 3/3 = 1
    #   w ∝ (exp(0.5·9/35), exp(0.5)), scaled to sum 2: task b (larger relative excess risk) gains weight
    second = excess_mtl_step(_J([[0, 3, 0], [0, 3, 0]]), first.state, robust_step_size=eta)
    torch.testing.assert_close(second.state.sq_grad_sum, _J([[9, 25, 0], [1, 9, 4]]))
    torch.testing.assert_close(second.excess, _J([1.8, 3.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(second.relative_excess, _J([9 / 35, 1.0]), atol=1e-7, rtol=0)
    u = np.exp(eta * np.array([9 / 35, 1.0]))
    expected = 2 * u / u.sum()  # (0.81639..., 1.18361...)
    torch.testing.assert_close(second.weights, torch.tensor(expected, dtype=F64), atol=1e-7, rtol=0)
    torch.testing.assert_close(second.state.log_weights, torch.tensor(np.log(expected), dtype=F64))
    assert second.state.baseline.tolist() == first.state.baseline.tolist()  # e⁰ is kept
    # the default η = 1e-2: w = 2·softmax(0.01·(9/35, 1)) = (0.99628..., 1.00371...)
    default = excess_mtl_step(_J([[0, 3, 0], [0, 3, 0]]), first.state)
    torch.testing.assert_close(default.weights, _J([0.99628573, 1.00371427]), atol=1e-8, rtol=0)

    # the strategy's compute_weights is the same rule, in float32 on the weights
    s = bound(ExcessMTL(robust_step_size=eta))
    assert s.compute_weights(_J([[3, 4, 0], [1, 0, 2]]).float(), torch.ones(2)).tolist() == [1.0, 1.0]
    w = s.compute_weights(_J([[0, 3, 0], [0, 3, 0]]).float(), torch.ones(2))
    torch.testing.assert_close(w.double(), torch.tensor(expected, dtype=F64), atol=1e-6, rtol=0)
    metrics = s.extra_metrics()
    assert metrics["train/excess_mtl/relative_excess/b"].item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["train/excess_mtl/relative_excess/a"].item() == pytest.approx(9 / 35, abs=1e-6)


def test_hand_computed_update_in_a_fit():
    # ScalarNet: θ0 = 1, L = (θ², 2(θ-3)²), g = (2θ, 4(θ-3)), lr 0.1; one shared scalar, so P = 1:
    # step 1: g = (2, -8), weights 1 -> θ1 = 1 - 0.1·(2 - 8) = 1.6; S = (4, 64), e⁰ = g²/√S = |g| = (2, 8)
    # step 2: g = (3.2, -5.6), S = (4 + 10.24, 64 + 31.36), e = g²/√S, r = e/e⁰, w = 2·softmax(η r)
    eta = 0.5
    net, strategy = ScalarNet(lr=0.1), ExcessMTL(robust_step_size=eta)
    trainer(max_steps=2, max_epochs=-1, callbacks=[strategy]).fit(net, dummy_loader(2))
    g1 = np.array([3.2, -5.6])
    S = np.array([4 + 3.2**2, 64 + 5.6**2])
    r = (g1**2 / np.sqrt(S)) / np.array([2.0, 8.0])  # (1.3568, 0.4014): task t0 is relatively further
    u = np.exp(eta * r)
    w = 2 * u / u.sum()
    assert net.theta.item() == pytest.approx(1.6 - 0.1 * float(w @ g1), abs=1e-5)
    assert list(strategy.weights.values()) == pytest.approx(w.tolist(), abs=1e-6)
    assert strategy.weights["t0"] > 1 > strategy.weights["t1"]
    torch.testing.assert_close(
        strategy.sq_grad_sum.double().flatten(), torch.tensor(S, dtype=F64), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(strategy.baseline, torch.tensor([2.0, 8.0], dtype=F64), rtol=1e-5, atol=0)


def test_excess_risks_formula():
    g = torch.Generator().manual_seed(3)
    J = torch.randn(3, 7, generator=g, dtype=F64)
    S = J.square() + torch.rand(3, 7, generator=g, dtype=F64)
    expected = torch.stack([J[i] @ torch.diag(1 / torch.sqrt(S[i] + 1e-7)) @ J[i] for i in range(3)])
    torch.testing.assert_close(excess_risks(J, S), expected)


def test_inplace_updates_the_given_accumulator_and_the_default_leaves_it():
    g = torch.Generator().manual_seed(5)
    J0, J1 = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    state = excess_mtl_step(J0).state
    before = state.sq_grad_sum.clone()
    copied = excess_mtl_step(J1, state, robust_step_size=0.3)
    assert torch.equal(state.sq_grad_sum, before)  # the default never mutates its input
    inplace = excess_mtl_step(J1, state, robust_step_size=0.3, inplace=True)
    assert inplace.state.sq_grad_sum is state.sq_grad_sum
    torch.testing.assert_close(state.sq_grad_sum, before + J1.square())
    for a, b in zip(inplace, copied):
        torch.testing.assert_close(
            a if isinstance(a, torch.Tensor) else a[0], b if isinstance(b, torch.Tensor) else b[0]
        )


def test_a_saved_state_is_a_copy_of_the_live_accumulator():
    s = bound(ExcessMTL(), "ab")
    s.compute_weights(torch.ones(2, 3), torch.ones(2))
    saved = s.state_dict()["state"]["method"]["sq_grad_sum"]
    s.compute_weights(torch.ones(2, 3), torch.ones(2))
    assert saved is not s.sq_grad_sum and saved.tolist() == [[1.0] * 3] * 2
    assert s.sq_grad_sum.tolist() == [[2.0] * 3] * 2
    loaded = {"sq_grad_sum": saved, "baseline": torch.ones(2), "log_weights": torch.zeros(2)}
    other = bound(ExcessMTL(), "ab")
    other.load_method_state(loaded)
    other.compute_weights(torch.ones(2, 3), torch.ones(2))
    assert saved.tolist() == [[1.0] * 3] * 2  # restoring does not alias the caller's tensor


# ------------------------------------------------------------------------------------------ TorchJD
def test_matches_torchjd_with_one_warmup_step():
    """TorchJD 0.18's ExcessMTLWeighting with n_warmup_steps=1 is the authors' rule: its first call stores the
    baseline with uniform weights; it normalises to sum 1 (ours: T) and divides by e⁰ + 1e-7 (ours: e⁰)."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    if not hasattr(aggregation, "ExcessMTLWeighting"):
        pytest.skip("this TorchJD has no ExcessMTLWeighting")
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([[1.0], [3.0], [0.2]], dtype=F64)
    for eta in (1e-2, 0.7):
        ref = aggregation.ExcessMTLWeighting(robust_step_size=eta, n_warmup_steps=1)
        ours = bound(ExcessMTL(robust_step_size=eta), "abc")
        state = None
        for _ in range(8):
            J = torch.randn(3, 11, generator=g, dtype=F64) * scales
            result = excess_mtl_step(J, state, robust_step_size=eta)
            state = result.state
            expected = 3 * ref(J)
            torch.testing.assert_close(result.weights, expected, atol=1e-6, rtol=0)
            strategy_weights = ours.compute_weights(J.float(), torch.ones(3)).double()
            torch.testing.assert_close(strategy_weights, expected, atol=1e-5, rtol=0)
        assert float((expected - 1).abs().max()) > (1e-3 if eta < 0.1 else 0.1)


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("seed", range(5))
def test_weights_sum_to_T_and_the_first_step_keeps_them_at_one(seed):
    g = torch.Generator().manual_seed(seed)
    state = None
    for step in range(20):
        result = excess_mtl_step(torch.randn(4, 9, generator=g, dtype=F64), state, robust_step_size=0.3)
        state = result.state
        if step == 0:
            assert result.weights.tolist() == [1.0] * 4
        assert float(result.weights.sum()) == pytest.approx(4.0, abs=1e-12)
        assert bool((result.weights > 0).all())
        torch.testing.assert_close(result.weights.log(), state.log_weights)


def test_the_task_with_the_larger_relative_excess_risk_gains_weight():
    """Task a's gradient stays at its initial size, task b's shrinks: a is further from convergence (relative
    to its own start) and gains weight, although its loss scale (×0.01) is far smaller than b's."""
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(2, 6, generator=g, dtype=F64)
    state, weights = None, []
    for t in range(10):
        J = direction * torch.tensor([[0.01], [0.7**t]], dtype=F64)
        result = excess_mtl_step(J, state, robust_step_size=0.5)
        state = result.state
        weights.append(result.weights)
        if t > 0:
            assert result.relative_excess[0] > result.relative_excess[1]
    w = torch.stack(weights)
    assert bool((w[1:, 0].diff() > 0).all())  # a's weight grows at every step
    assert float(w[-1, 0]) > 1.5


@pytest.mark.parametrize("seed", range(3))
def test_scaling_a_task_loss_leaves_the_weights_unchanged(seed):
    """gᵢ -> c·gᵢ gives Sᵢ -> c²Sᵢ, eᵢ and e⁰ᵢ -> c·eᵢ, c·e⁰ᵢ: the same rᵢ (exactly, but for ε)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor([[1.0], [100.0], [0.01]], dtype=F64)
    plain = scaled = None
    for _ in range(6):
        J = torch.randn(3, 8, generator=g, dtype=F64)
        plain = excess_mtl_step(J, plain and plain.state, robust_step_size=0.5, eps=1e-30)
        scaled = excess_mtl_step(c * J, scaled and scaled.state, robust_step_size=0.5, eps=1e-30)
        torch.testing.assert_close(scaled.weights, plain.weights, atol=1e-12, rtol=0)
        torch.testing.assert_close(scaled.excess, plain.excess * c.squeeze(1))
    assert float((plain.weights - 1).abs().max()) > 1e-2


def test_scaling_a_task_loss_in_a_fit_keeps_the_weights():
    class Scaled(ConflictNet):
        def task_losses(self, batch, batch_idx):
            losses = super().task_losses(batch, batch_idx)
            return {**losses, "b": 50.0 * losses["b"]}

    data = loader(make_data(n=32), batch_size=8)
    s_plain, s_scaled = ExcessMTL(robust_step_size=0.5), ExcessMTL(robust_step_size=0.5)
    trainer(max_steps=1, callbacks=[s_plain]).fit(ConflictNet(), data)
    trainer(max_steps=1, callbacks=[s_scaled]).fit(Scaled(), data)
    # the same first step: task b's gradient ×50, so e⁰_b ×50 and S_b ×2500
    torch.testing.assert_close(s_scaled.baseline[[0, 2]], s_plain.baseline[[0, 2]], rtol=1e-5, atol=0)
    torch.testing.assert_close(s_scaled.baseline[1], 50 * s_plain.baseline[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(s_scaled.sq_grad_sum[1], 2500 * s_plain.sq_grad_sum[1], rtol=1e-4, atol=0)
    # a second step with the same gradients, b's ×50: the same weights
    g = torch.Generator().manual_seed(0)
    J = torch.randn(s_plain.sq_grad_sum.shape, generator=g)
    w_plain = s_plain.compute_weights(J, torch.ones(3))
    w_scaled = s_scaled.compute_weights(J * torch.tensor([[1.0], [50.0], [1.0]]), torch.ones(3))
    torch.testing.assert_close(w_scaled, w_plain, atol=1e-5, rtol=0)
    assert float((w_plain - 1).abs().max()) > 1e-2


def test_a_long_run_saturates_the_weights_without_overflow():
    J = torch.tensor([[1.0, 2.0], [1e-3, 1e-3]], dtype=F64)
    far = torch.tensor([[1e6], [1.0]], dtype=F64)  # after the first step task a's excess risk is ~1e6 e⁰_a
    state = None
    for t in range(400):
        result = excess_mtl_step(J if t == 0 else J * far, state, robust_step_size=10.0)
        state = result.state
    # the multiplicative form would compute exp(1e7) = inf and then inf/inf = nan
    assert bool(torch.isfinite(state.log_weights).all())
    torch.testing.assert_close(result.weights, torch.tensor([2.0, 0.0], dtype=F64))


def test_a_zero_first_gradient_defers_that_tasks_baseline():
    # step 1: task b does not reach the shared parameters: e_b = 0, no baseline (the authors' code would
    # divide by 0 at step 2)
    s1 = excess_mtl_step(_J([[3, 4, 0], [0, 0, 0]]), robust_step_size=0.5)
    assert s1.state.baseline.tolist() == pytest.approx([7.0, 0.0], abs=1e-6)
    # step 2: S = [[9, 25, 0], [4, 0, 0]]: e = (9/5, 4/2); b's first non-zero e becomes e⁰_b = 2 and its
    # weight does not move at this step: r = (9/35, 0)
    s2 = excess_mtl_step(_J([[0, 3, 0], [2, 0, 0]]), s1.state, robust_step_size=0.5)
    assert s2.state.baseline.tolist() == pytest.approx([7.0, 2.0], abs=1e-6)
    torch.testing.assert_close(s2.relative_excess, _J([9 / 35, 0.0]), atol=1e-7, rtol=0)
    u = np.exp(0.5 * np.array([9 / 35, 0.0]))
    torch.testing.assert_close(s2.weights, torch.tensor(2 * u / u.sum(), dtype=F64), atol=1e-7, rtol=0)
    # step 3: S_b = [8, 0, 0]: e_b = 4/√8 = √2, r_b = √2/2 (relative to its own first excess risk); e_a = 0
    s3 = excess_mtl_step(_J([[0, 0, 0], [2, 0, 0]]), s2.state, robust_step_size=0.5)
    torch.testing.assert_close(s3.relative_excess, _J([0.0, math.sqrt(2) / 2]), atol=1e-7, rtol=0)
    assert bool(torch.isfinite(s3.weights).all())


class DeadTaskNet(TinyNet):
    """Task c's loss does not depend on the shared encoder: its shared gradient is zero, its head's is not."""

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        out = {t: nn.functional.mse_loss(self.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate("ab")}
        out["c"] = nn.functional.mse_loss(self.heads["c"](z.detach()).squeeze(1), y[:, 2])
        return out


def test_a_task_that_never_reaches_the_shared_parameters_warns_and_stays_finite():
    strategy = ExcessMTL(robust_step_size=0.5)
    with pytest.warns(RuntimeWarning, match="'c' has a zero gradient"):
        trainer(max_epochs=2, callbacks=[strategy]).fit(DeadTaskNet(), loader(make_data(n=32), batch_size=8))
    w = strategy.weights_tensor()
    assert bool(torch.isfinite(w).all()) and float(w.sum()) == pytest.approx(3.0, abs=1e-5)
    assert strategy.baseline[2] == 0 and bool((strategy.baseline[:2] > 0).all())
    assert float(w[2]) < 1  # r_c = 0 while the others' r > 0


# ------------------------------------------------------------------------------------------ the strategy
def _train(strategy, model=None, *, epochs=2, n=64, batch_size=16, **kwargs):
    model = model or ConflictNet()
    trainer(max_epochs=epochs, callbacks=[strategy], **kwargs).fit(
        model, loader(make_data(n=n), batch_size=batch_size)
    )
    return model


def _mean_loss(model) -> float:
    x, y = make_data(n=64)[:]
    with torch.no_grad():
        return float(sum(model.task_losses((x, y), 0).values()))


def test_the_update_equals_the_functional_rule_on_independent_gradients():
    """Two steps of a fit: the weights are excess_mtl_step on per-task gradients taken by plain autograd."""
    model, reference, data = ConflictNet(lr=0.05), ConflictNet(lr=0.05), make_data(n=32)
    shared = list(reference.encoder.parameters())
    state = None
    for step in range(2):
        losses = reference.task_losses(data[step * 16 : (step + 1) * 16], 0)
        rows = [torch.autograd.grad(losses[t], shared, retain_graph=True) for t in "abc"]
        J = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])
        result = excess_mtl_step(J, state, robust_step_size=0.5)
        state = result.state
        reference.zero_grad()
        sum(float(w) * losses[t] for w, t in zip(result.weights, "abc")).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.05 * p.grad
    strategy = ExcessMTL(robust_step_size=0.5)
    trainer(max_steps=2, callbacks=[strategy]).fit(model, loader(data, batch_size=16))
    torch.testing.assert_close(strategy.weights_tensor().double(), result.weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(flat_params(model), flat_params(reference), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(strategy.sq_grad_sum, state.sq_grad_sum, atol=1e-7, rtol=1e-5)
    assert float((result.weights - 1).abs().max()) > 1e-3


def test_a_fit_trains_and_the_logged_weights_sum_to_T():
    model = ConflictNet(lr=0.02)
    before = _mean_loss(model)
    strategy = ExcessMTL(robust_step_size=0.1)
    _train(strategy, model, epochs=4)
    assert _mean_loss(model) < 0.8 * before
    w = strategy.weights_tensor()
    assert float(w.sum()) == pytest.approx(3.0, abs=1e-5)
    assert float((w - 1).abs().max()) > 1e-3
    assert strategy.sq_grad_sum.shape == (3, sum(p.numel() for p in model.encoder.parameters()))


def test_accumulation_equals_the_large_batch():
    """k micro-batches of B average the Jacobian and update S once: equal to one batch of k·B."""
    big, small = ConflictNet(), ConflictNet(accumulate_grad_batches=4)
    s_big, s_small = ExcessMTL(robust_step_size=0.5), ExcessMTL(robust_step_size=0.5)
    _train(s_big, big, batch_size=32)
    _train(s_small, small, batch_size=8)
    torch.testing.assert_close(s_small.weights_tensor(), s_big.weights_tensor(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_params(small), flat_params(big), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s_small.sq_grad_sum, s_big.sq_grad_sum, atol=1e-6, rtol=1e-5)
    assert float((s_big.weights_tensor() - 1).abs().max()) > 1e-3


class _Recording(ExcessMTL):
    def on_optimizer_step(self, module, skipped):
        super().on_optimizer_step(module, skipped)
        self.history = [
            *getattr(self, "history", []),
            (self.sq_grad_sum.clone(), self.weights_tensor().clone()),
        ]


def test_update_every_moves_the_state_only_on_update_steps():
    strategy = _Recording(robust_step_size=0.5, update_every=3)
    trainer(max_steps=7, callbacks=[strategy]).fit(ConflictNet(), loader(make_data(n=56), batch_size=8))
    S, w = zip(*strategy.history)
    # steps 0, 3 and 6 update S and the weights; steps 1, 2, 4, 5 take no per-task gradient and reuse both
    for a, b in ((0, 1), (1, 2), (3, 4), (4, 5)):
        assert torch.equal(S[a], S[b]) and torch.equal(w[a], w[b])
    for a, b in ((2, 3), (5, 6)):
        assert not torch.equal(S[a], S[b]) and not torch.equal(w[a], w[b])
    assert float(w[-1].sum()) == pytest.approx(3.0, abs=1e-5)


def _fp16(init_scale: float = 2.0**10) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_and_matches_fp32(precision):
    reference = ExcessMTL(robust_step_size=0.5)
    _train(reference, ConflictNet(lr=0.02), epochs=2)
    model = ConflictNet(lr=0.02)
    before = _mean_loss(model)
    strategy = ExcessMTL(robust_step_size=0.5)
    kwargs = {"plugins": [_fp16()]} if precision == "16-mixed" else {"precision": "bf16-mixed"}
    _train(strategy, model, epochs=2, **kwargs)
    assert _mean_loss(model) < before
    w = strategy.weights_tensor()
    assert bool(torch.isfinite(w).all()) and float(w.sum()) == pytest.approx(3.0, abs=1e-5)
    tol = 2e-3 if precision == "16-mixed" else 3e-2
    torch.testing.assert_close(w, reference.weights_tensor(), atol=tol, rtol=tol)


def test_fp16_overflow_skips_the_step_and_leaves_the_state():
    plugin = _fp16(init_scale=2.0**30)  # the fp16 gradients overflow: the scaler skips the step
    model, strategy = ConflictNet(), ExcessMTL()
    before = flat_params(model)
    trainer(max_steps=1, plugins=[plugin], callbacks=[strategy]).fit(
        model, loader(make_data(n=16), batch_size=16)
    )
    assert plugin.scaler.get_scale() < 2.0**30
    assert torch.equal(flat_params(model), before)
    assert strategy.sq_grad_sum is None and strategy.baseline is None


# ------------------------------------------------------------------------------------------ state
def test_state_is_restored_by_task_name():
    g = torch.Generator().manual_seed(4)
    Js = [torch.randn(3, 5, generator=g) for _ in range(4)]
    s = bound(ExcessMTL(robust_step_size=0.5), "abc")
    for J in Js[:3]:
        s.compute_weights(J, torch.ones(3))
    saved = s.state_dict()
    assert saved["state"]["method"]["sq_grad_sum"].device.type == "cpu"
    perm = [2, 0, 1]
    other = bound(ExcessMTL(robust_step_size=0.5), ("c", "a", "b"))
    other.load_state_dict(saved)
    torch.testing.assert_close(other.sq_grad_sum, s.sq_grad_sum[perm])
    torch.testing.assert_close(other.baseline, s.baseline[perm])
    torch.testing.assert_close(other.log_weights, s.log_weights[perm])
    torch.testing.assert_close(
        other.compute_weights(Js[3][perm], torch.ones(3)), s.compute_weights(Js[3], torch.ones(3))[perm]
    )


def test_resume_with_another_step_size_is_refused():
    s = bound(ExcessMTL(robust_step_size=0.5), "abc")
    s.compute_weights(torch.ones(3, 4), torch.ones(3))
    with pytest.raises(ValueError, match=r"robust_step_size: saved 0\.5, current 0\.01"):
        bound(ExcessMTL(), "abc").load_state_dict(s.state_dict())


def test_a_state_for_other_shared_parameters_is_a_clear_error():
    s = bound(ExcessMTL(), "ab")
    s.load_method_state(
        {"sq_grad_sum": torch.ones(2, 3), "baseline": torch.ones(2), "log_weights": torch.zeros(2)}
    )
    with pytest.raises(ValueError, match=r"S has shape \(2, 3\).*shape \(2, 5\).*another model"):
        s.compute_weights(torch.ones(2, 5), torch.ones(2))


def test_load_renormalises_the_log_weights_and_resets():
    s = bound(ExcessMTL(), "ab")
    s.load_method_state(
        {"sq_grad_sum": torch.ones(2, 3), "baseline": torch.ones(2), "log_weights": torch.tensor([0.5, 0.1])}
    )
    assert float(s.log_weights.exp().sum()) == pytest.approx(2.0)
    torch.testing.assert_close(s.log_weights, normalized_log_weights(torch.tensor([0.5, 0.1])))
    with pytest.raises(ValueError, match=r"lacks \['baseline'\]"):
        s.load_method_state({"sq_grad_sum": torch.ones(2, 3), "log_weights": torch.zeros(2)})
    s.reset_state()
    assert s.sq_grad_sum is None and s.weights_tensor() is None


RESUMABLE = {
    "default": lambda: ExcessMTL(robust_step_size=0.5),
    "every2": lambda: ExcessMTL(robust_step_size=0.5, update_every=2),
}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_resume_matches_uninterrupted(tmp_path, name):
    data = loader(make_data(n=40), batch_size=8)
    straight, s_straight = ConflictNet(optimizer="adam", lr=0.01), RESUMABLE[name]()
    trainer(max_epochs=2, callbacks=[s_straight]).fit(straight, data)
    t1 = trainer(max_epochs=1, callbacks=[RESUMABLE[name]()])
    t1.fit(ConflictNet(optimizer="adam", lr=0.01), data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = ConflictNet(optimizer="adam", lr=0.01), RESUMABLE[name]()
    trainer(max_epochs=2, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.weights_tensor(), s_straight.weights_tensor(), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.sq_grad_sum, s_straight.sq_grad_sum, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s_resumed.baseline, s_straight.baseline)
    assert float((s_straight.weights_tensor() - 1).abs().max()) > 1e-3
    state = torch.load(tmp_path / "half.ckpt", weights_only=True)["callbacks"]  # tensors and primitives only
    assert any("ExcessMTL" in key for key in state)


def test_mid_epoch_resume_by_steps(tmp_path):
    def run(max_steps, ckpt=None):
        net, strategy = ScalarNet(lr=0.01), ExcessMTL(robust_step_size=0.5)
        t = trainer(max_epochs=-1, max_steps=max_steps, callbacks=[strategy])
        t.fit(net, dummy_loader(4), ckpt_path=ckpt)
        return t, net, strategy

    _, straight, s_straight = run(10)
    t_half, _, _ = run(3)
    t_half.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed, s_resumed = run(10, tmp_path / "mid.ckpt")
    assert resumed.theta.item() == pytest.approx(straight.theta.item(), abs=1e-6)
    assert s_resumed.weights == pytest.approx(s_straight.weights, abs=1e-6)


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, lambda: ExcessMTL(robust_step_size=0.5), epochs=3, tag="excess"
    )
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    s0, s1 = rank0["state"]["state"]["method"], rank1["state"]["state"]["method"]
    assert all(torch.equal(s0[k], s1[k]) for k in ("sq_grad_sum", "baseline", "log_weights"))
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, abs=1e-5), task
    ss = single["state"]["state"]["method"]
    torch.testing.assert_close(s0["sq_grad_sum"], ss["sq_grad_sum"], atol=1e-5, rtol=1e-5)
    assert any(abs(w - 1) > 1e-3 for w in single["weights"].values())


@pytest.mark.ddp_extra  # the same mechanism as MoCo's local-sync / MoDo's and SDMGrad's DDP test
@pytest.mark.timeout(240)
def test_local_sync_keeps_every_rank_identical(tmp_path):
    """sync="local": each rank updates S, e⁰ and log w from its own gradients and the base averages them over
    ranks (log w renormalised): an approximation of the exact run, but the ranks never drift apart."""
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, lambda: ExcessMTL(robust_step_size=0.5, sync="local"), epochs=2, tag="excess-local"
    )
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    s0, s1 = rank0["state"]["state"]["method"], rank1["state"]["state"]["method"]
    assert all(torch.equal(s0[k], s1[k]) for k in ("sq_grad_sum", "baseline", "log_weights"))
    assert sum(rank0["weights"].values()) == pytest.approx(3.0, abs=1e-5)
    assert float(s0["log_weights"].exp().sum()) == pytest.approx(3.0, abs=1e-9)
    assert any(abs(w - 1) > 1e-3 for w in rank0["weights"].values())


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(robust_step_size=0.0), r"robust_step_size.*> 0.*0\.0"),
        (dict(robust_step_size=-1e-2), r"robust_step_size.*-0\.01"),
        (dict(robust_step_size=math.inf), r"robust_step_size.*inf"),
        (dict(robust_step_size=True), r"robust_step_size.*True"),
        (dict(robust_step_size="0.1"), r"robust_step_size.*'0\.1'"),
        (dict(mode="representation"), r"ExcessMTL does not support mode='representation'.*mode='parameters'"),
        (dict(update_every=0), r"update_every.*0"),
        (dict(sync="global"), r"sync"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExcessMTL(**kwargs)


def test_functional_bad_input():
    J = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"robust_step_size.*nan"):
        excess_mtl_step(J, robust_step_size=math.nan)
    with pytest.raises(ValueError, match=r"eps.*0"):
        excess_mtl_step(J, eps=0)
    with pytest.raises(ValueError, match=r"J must be finite"):
        excess_mtl_step(torch.tensor([[1.0, math.inf]]))
    with pytest.raises(ValueError, match=r"J must be finite"):
        excess_mtl_step(torch.tensor([[1.0, math.nan]]), excess_mtl_step(torch.ones(1, 2)).state)
    with pytest.raises(ValueError, match=r"J must be a \[T, P\]"):
        excess_mtl_step(torch.ones(3))
    state = excess_mtl_step(J).state
    with pytest.raises(ValueError, match=r"sq_grad_sum must have J's shape \(2, 4\).*\(2, 3\)"):
        excess_mtl_step(torch.ones(2, 4), state)
    bad = ExcessMTLState(state.sq_grad_sum, torch.tensor([1.0, -1.0], dtype=F64), state.log_weights)
    with pytest.raises(ValueError, match=r"baseline must be finite and >= 0"):
        excess_mtl_step(J, bad)


class NoShared(TinyNet):
    def shared_parameters(self):
        return None


def test_no_shared_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match=r"ExcessMTL needs the shared parameters"):
        trainer(max_steps=1, callbacks=[ExcessMTL()]).fit(NoShared(), loader(make_data(n=8)))


def test_configurable_from_yaml(tmp_path):
    """LightningCLI builds it from class_path + init_args (the constructor's type hints are accurate)."""
    yaml = pytest.importorskip("yaml")
    from lightning.pytorch.cli import LightningCLI

    from lightning_mtl import MultiTaskModule

    strategy = {
        "class_path": "lightning_mtl.strategies.excess_mtl.ExcessMTL",
        "init_args": {"robust_step_size": 0.05, "update_every": 2, "jacobian": "loop"},
    }
    config = {
        "trainer": {"callbacks": [strategy], "logger": False},
        "model": {"class_path": "lightning_mtl.datasets.MLPMultiTask", "init_args": {"tasks": ["digit"]}},
        "data": {"class_path": "lightning_mtl.datasets.BuiltinDataModule", "init_args": {"batch_size": 16}},
    }
    path = tmp_path / "excess.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(
        MultiTaskModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", str(path)],
        run=False,
        save_config_callback=None,
    )
    (built,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ExcessMTL)]
    assert built.robust_step_size == 0.05 and built.update_every == 2
