"""FAMO (Liu et al., NeurIPS 2023, arXiv:2306.03792): hand-computed steps, the module's post-step hook, AMP,
resume, DDP, TorchJD."""

from __future__ import annotations

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

from lightning_mtl.functional import famo_effective_weights, famo_logits_grad, famo_objective, famo_weights
from lightning_mtl.strategies import FAMO

EPS = 1e-8


def _losses(theta: float) -> np.ndarray:  # ScalarNet: L = (θ², 2(θ-3)²)
    return np.array([theta**2, 2 * (theta - 3) ** 2])


def _dlosses(theta: float) -> np.ndarray:
    return np.array([2 * theta, 4 * (theta - 3)])


class _Adam:  # torch.optim.Adam's rule, by hand (L2 weight decay added to the gradient)
    def __init__(self, n: int, lr: float, wd: float) -> None:
        self.lr, self.wd, self.m, self.v, self.t = lr, wd, np.zeros(n), np.zeros(n), 0

    def step(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        g = g + self.wd * x
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        mh, vh = self.m / (1 - 0.9**self.t), self.v / (1 - 0.999**self.t)
        return x - self.lr * mh / (np.sqrt(vh) + 1e-8)


# ------------------------------------------------------------------------------------------ hand-computed
def test_hand_computed_logit_and_model_steps():
    net, strategy = ScalarNet(lr=0.1), FAMO(lr=0.025, weight_decay=1e-3)
    trainer(max_steps=2, callbacks=[strategy]).fit(net, dummy_loader(2))
    theta, xi, adam = 1.0, np.zeros(2), _Adam(2, 0.025, 1e-3)
    for _ in range(2):
        z = np.exp(xi) / np.exp(xi).sum()
        before = _losses(theta) + EPS
        c = np.sum(z / before)
        w = z / (c * before)
        assert w.sum() == pytest.approx(1.0)
        theta -= 0.1 * float(np.sum(w * _dlosses(theta)))
        d = np.log(before) - np.log(_losses(theta) + EPS)
        delta = z * d - z * np.sum(z * d)  # J_softmax(ξ)ᵀ d, J = diag(z) − zzᵀ
        xi = adam.step(xi, delta)
    assert net.theta.item() == pytest.approx(theta, abs=1e-6)
    np.testing.assert_allclose(strategy.logits.detach().numpy(), xi, atol=1e-6)
    assert not np.allclose(xi, 0)
    # the reported weights are the last step's effective weights; they sum to 1
    assert sum(strategy.weights.values()) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(list(strategy.weights.values()), w, atol=1e-6)


def test_functional_invariants():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        xi = torch.randn(4, generator=g, dtype=torch.float64)
        losses = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
        low = torch.rand(4, generator=g, dtype=torch.float64) * 0.4
        w = famo_effective_weights(xi, losses, low)
        assert w.sum().item() == pytest.approx(1.0)
        x = losses.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(famo_objective(xi, x, low), x)
        torch.testing.assert_close(grad, w)  # the objective's gradient is Σ wᵢ∇Lᵢ
        after = losses * 0.9
        p = xi.clone().requires_grad_(True)
        d = (losses - low + EPS).log() - (after - low + EPS).log()
        (ref,) = torch.autograd.grad(torch.softmax(p, -1), p, grad_outputs=d)
        torch.testing.assert_close(famo_logits_grad(xi, losses, after, low), ref)
        torch.testing.assert_close(famo_weights(xi), torch.softmax(xi, -1))


def test_matches_torchjd_famo():
    torchjd_famo = pytest.importorskip("torchjd.scalarization").FAMO
    g = torch.Generator().manual_seed(1)
    ours = bound(FAMO(lr=0.025, weight_decay=1e-3, min_losses={"a": 0.1, "c": 0.2}), "abc")
    ref = torchjd_famo(3, min_losses=torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64), lr=0.025)
    ref = ref.double()
    for _ in range(5):
        before = torch.rand(3, generator=g, dtype=torch.float64) + 0.3
        after = before * (0.7 + 0.5 * torch.rand(3, generator=g, dtype=torch.float64))
        x = before.clone().requires_grad_(True)
        (ref_w,) = torch.autograd.grad(ref(x), x)
        torch.testing.assert_close(ours.compute_weights(before), ref_w)
        torch.testing.assert_close(ours.objective(before), ref(before).detach())
        ref.update(after)
        ours.on_post_step_losses(_FakeModule(), before, after)
        torch.testing.assert_close(ours.logits.detach().double(), ref._w.detach(), atol=1e-6, rtol=0)


class _FakeModule:
    trainer = None


def test_arguments_and_bounds_are_checked():
    with pytest.raises(ValueError, match="lr"):
        FAMO(lr=0)
    with pytest.raises(ValueError, match="weight_decay"):
        FAMO(weight_decay=-1)
    with pytest.raises(ValueError, match="unknown task"):
        bound(FAMO(min_losses={"zz": 0.0}), "ab")
    s = bound(FAMO(min_losses={"b": 1.0}), "ab")
    with pytest.raises(ValueError, match=r"'b': 0\.5"):
        s.compute_weights(torch.tensor([0.2, 0.5]))
    with pytest.raises(ValueError, match="after the optimizer step.*'a': 0\\.0"):
        s.on_post_step_losses(_FakeModule(), torch.tensor([0.2, 1.5]), torch.tensor([0.0, 1.2]))


# ------------------------------------------------------------------------------------------ the module hook
class _Counting(ScalarNet):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.post_step_calls: list[int] = []
        self.user_logs = 0

    def task_losses(self, batch, batch_idx):
        if not torch.is_grad_enabled():
            assert self.training
            self.post_step_calls.append(batch_idx)
        self.log("user/value", self.theta.detach(), on_step=True, on_epoch=False, batch_size=1)
        return super().task_losses(batch, batch_idx)

    def log(self, name, *args, **kwargs):
        if name == "user/value":
            self.user_logs += 1
        return super().log(name, *args, **kwargs)


def test_post_step_forward_once_per_optimizer_step_on_the_last_micro_batch_and_silenced():
    net, strategy = _Counting(accumulate_grad_batches=2), FAMO()
    trainer(max_epochs=1, callbacks=[strategy]).fit(net, dummy_loader(5))
    # windows (0, 1), (2, 3), (4): one recomputation per optimizer step, on the window's last micro-batch
    assert net.post_step_calls == [1, 3, 4]
    assert net.user_logs == 5  # the training forwards only
    assert not torch.equal(strategy.logits.detach(), torch.zeros(2))


def test_strategies_without_the_flag_get_no_extra_forward():
    from lightning_mtl.strategies import EqualWeighting

    net = _Counting()
    trainer(max_epochs=1, callbacks=[EqualWeighting()]).fit(net, dummy_loader(3))
    assert net.post_step_calls == []


def _fp16(init_scale: float) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_a_step_the_scaler_skips_leaves_the_logits():
    # gradients ~100 times a scale of 2^127 overflow: the GradScaler skips the first step
    net, strategy = _Counting(k=(100.0, 200.0)), FAMO()
    trainer(max_steps=1, callbacks=[strategy], plugins=[_fp16(2.0**127)]).fit(net, dummy_loader(1))
    assert net.theta.item() == 1.0
    assert net.post_step_calls == []
    assert torch.equal(strategy.logits.detach(), torch.zeros(2))
    # a step taken under AMP updates them, from unscaled losses: as in full precision
    plain, s_plain = ScalarNet(), FAMO()
    trainer(max_steps=2, callbacks=[s_plain]).fit(plain, dummy_loader(2))
    amp, s_amp = ScalarNet(), FAMO()
    trainer(max_steps=2, callbacks=[s_amp], plugins=[_fp16(1024.0)]).fit(amp, dummy_loader(2))
    torch.testing.assert_close(s_amp.logits.detach(), s_plain.logits.detach(), atol=1e-5, rtol=0)


class _NaNOnce(ScalarNet):
    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        if batch_idx == 0 and torch.is_grad_enabled():
            losses["t0"] = losses["t0"] * float("nan")
        return losses


def test_a_discarded_window_leaves_the_logits():
    net, strategy = _NaNOnce(nonfinite="skip"), FAMO()
    with pytest.warns(UserWarning):
        trainer(max_steps=1, max_epochs=1, callbacks=[strategy]).fit(net, dummy_loader(1))
    assert net.skipped_steps == 1
    assert torch.equal(strategy.logits.detach(), torch.zeros(2))


# ------------------------------------------------------------------------------------------ state, resume
def test_state_is_restored_by_task_name():
    s = bound(FAMO(min_losses={"a": 0.1}), "abc")
    before, after = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.9, 2.0])
    s.compute_weights(before)
    s.on_post_step_losses(_FakeModule(), before, after)
    other = bound(FAMO(min_losses={"a": 0.1}), ("c", "a", "b"))
    other.load_state_dict(s.state_dict())
    torch.testing.assert_close(other.logits.detach(), s.logits.detach()[[2, 0, 1]])
    nxt = torch.tensor([0.4, 1.8, 1.9])
    torch.testing.assert_close(other.compute_weights(nxt[[2, 0, 1]]), s.compute_weights(nxt)[[2, 0, 1]])
    with pytest.raises(ValueError, match="min_losses"):
        bound(FAMO(), "abc").load_state_dict(s.state_dict())


def test_resume_matches_uninterrupted(tmp_path):
    data = loader(make_data(n=48), batch_size=12)
    straight, s_straight = TinyNet(optimizer="adam", lr=0.01), FAMO()
    trainer(max_epochs=4, callbacks=[s_straight]).fit(straight, data)

    t1 = trainer(max_epochs=2, callbacks=[FAMO()])
    t1.fit(TinyNet(optimizer="adam", lr=0.01), data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = TinyNet(optimizer="adam", lr=0.01), FAMO()
    trainer(max_epochs=4, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")

    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.logits.detach(), s_straight.logits.detach(), atol=1e-6, rtol=0)
    assert not torch.equal(s_straight.logits.detach(), torch.zeros(3))


# ------------------------------------------------------------------------------------------ DDP
B = 8


@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    single, rank0, rank1 = ddp_parity_records(tmp_path, lambda: FAMO(lr=0.05), epochs=2, tag="famo")
    assert torch.equal(rank0["params"], rank1["params"])
    xi = [r["state"]["state"]["learnable"]["values"] for r in (single, rank0, rank1)]
    assert torch.equal(xi[1], xi[2])
    assert rank0["global_step"] == single["global_step"] == 2 * 64 // (2 * B)
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xi[1], xi[0], atol=1e-5, rtol=1e-5)
    assert not torch.equal(xi[0], torch.zeros(3))


# ------------------------------------------------------------------------------------------ the papers' toy
@pytest.mark.timeout(60)
def test_two_objective_toy_reaches_the_pareto_front():
    # the CAGrad/Nash-MTL/FAMO toy with Nash-MTL's scales (L₁ × 0.1) and its starts but (0, 0), where both
    # losses and gradients are 0; short version: lr 0.1 with cosine decay, 1000 steps (the paper: 1e-3, 100k).
    # The toy's losses are negative: ℓ* just below their lower bounds (L₁ ≥ −2, L₂ ≥ −20).
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "examples"))
    import pareto_toy

    starts = [s for s in pareto_toy.STARTS["nash"] if s != (0.0, 0.0)]
    scales, low, steps = pareto_toy.SCALES["nash"], torch.tensor([-2.1, -20.1], dtype=torch.float64), 1000
    x = torch.tensor(starts, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    xi = torch.zeros(len(starts), 2, dtype=torch.float64, requires_grad=True)
    xi_opt = torch.optim.Adam([xi], lr=0.025, weight_decay=1e-3)
    for _ in range(steps):
        losses, jac = pareto_toy.toy_jacobian(x, scales)
        w = torch.stack([famo_effective_weights(xi[k].detach(), losses[k], low) for k in range(len(starts))])
        x.grad = torch.einsum("st,stp->sp", w, jac)
        opt.step()
        sched.step()
        after = pareto_toy.toy_losses(x.detach(), scales)
        xi.grad = torch.stack(
            [famo_logits_grad(xi[k].detach(), losses[k], after[k], low) for k in range(len(starts))]
        )
        xi_opt.step()
    for start, end in zip(starts, x.detach()):
        _, jac = pareto_toy.toy_jacobian(end, scales)
        assert pareto_toy.pareto_stationarity(jac) < 0.05, (start, end.tolist())
        assert end[1] < -7.0, (start, end.tolist())
