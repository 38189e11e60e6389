"""SDMGrad (Xiao, Ban & Ji, NeurIPS 2023, arXiv:2305.18409): hand-computed steps, TorchJD, invariants (λ = 0 ≈
MGDA, λ → ∞ = mean gradient), the batch parts, state by task name, resume, DDP, AMP, accumulation."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import ConflictNet, TinyNet, bound, ddp_parity_records, flat_params, loader, make_data, trainer
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import TensorDataset

from lightning_mtl.functional.mgda import mgda_weights
from lightning_mtl.functional.modo import cross_gramian
from lightning_mtl.functional.sdmgrad import (
    sdmgrad_coefficients,
    sdmgrad_direction,
    sdmgrad_step,
    sdmgrad_weights,
)
from lightning_mtl.strategies.sdmgrad import SDMGrad

F64 = torch.float64


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def _part_jacobians(model: TinyNet, batch, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The Jacobians [k, T, P] of the k contiguous parts' mean losses w.r.t. the encoder, and the heads'
    gradient of the whole batch's Σ Lᵢ, by plain autograd (one call per part and task)."""
    shared = list(model.encoder.parameters())
    heads = list(model.heads.parameters())
    x, y = batch
    parts = []
    for xs, ys in zip(torch.tensor_split(x, k), torch.tensor_split(y, k)):
        losses = model.task_losses((xs, ys), 0).values()
        rows = [
            torch.cat([g.flatten() for g in torch.autograd.grad(L, shared, retain_graph=True)])
            for L in losses
        ]
        parts.append(torch.stack(rows))
    whole = sum(model.task_losses((x, y), 0).values())
    head_grad = torch.cat([g.flatten() for g in torch.autograd.grad(whole, heads)])
    return torch.stack(parts), head_grad


# ------------------------------------------------------------------------------------------ hand-computed
HAND_PARTS = torch.stack([_t([[1, 0], [0, 1]]), _t([[1, 0], [0, 9]]), _t([[1, 1], [0, 2]])])


def test_hand_computed_two_inner_steps_and_the_direction():
    # ξ = part 0, ξ′ = part 1, ζ = part 2.  M = J₀J₁ᵀ = diag(1, 9); √diag = (1, 3), s = 2, A = M/s² = diag(¼, 9/4)
    # λ = ½: b = λ·rowmean(A) = ½·(1/8, 9/8) = (1/16, 9/16);  lr = 0.2, momentum ½, w₀ = (½, ½)
    # inner step 1: g = Aw + b = (1/8 + 1/16, 9/8 + 9/16) = (0.1875, 1.6875) = v
    #   w − lr·v = (0.4625, 0.1625), sum 0.625 -> θ = −0.1875 -> w = (0.65, 0.35)
    # inner step 2: g = (0.1625 + 0.0625, 0.7875 + 0.5625) = (0.225, 1.35); v = ½(0.1875, 1.6875) + g
    #   = (0.31875, 2.19375); w − lr·v = (0.58625, −0.08875); sorted Σ − 1 = (−0.41375, −0.5025):
    #   j = 2: −0.08875 + 0.25125 > 0 -> ρ = 2, θ = −0.25125 -> w = (0.8375, 0.1625)
    w = sdmgrad_weights(
        cross_gramian(HAND_PARTS[0], HAND_PARTS[1]), None, lam=0.5, lr=0.2, momentum=0.5, n_iter=2
    )
    torch.testing.assert_close(w, _t([0.8375, 0.1625]))
    # c = (w + λ/T)/(1 + λ) = ((0.8375, 0.1625) + 0.25)/1.5 = (0.725, 0.275); d = J₂ᵀc = (0.725, 0.725 + 0.55)
    d, w2, c = sdmgrad_direction(HAND_PARTS, None, lam=0.5, lr=0.2, momentum=0.5, n_iter=2)
    torch.testing.assert_close(w2, w)
    torch.testing.assert_close(c, _t([0.725, 0.275]))
    torch.testing.assert_close(d, _t([0.725, 1.275]))
    # without ζ (held out by the strategy): the same w and c from parts 0 and 1 alone
    w3, c3 = sdmgrad_step(HAND_PARTS[:2], None, lam=0.5, lr=0.2, momentum=0.5, n_iter=2)
    torch.testing.assert_close(w3, w)
    torch.testing.assert_close(c3, c)


def test_the_strategy_with_zeta_held_out_returns_its_coefficients():
    parts = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(3))
    held, formed = bound(SDMGrad(lr=1.0), tuple("abcd")), bound(SDMGrad(lr=1.0), tuple("abcd"))
    out_held, out_formed = (
        held.compute_direction(parts[:2], torch.ones(4)),
        formed.compute_direction(parts, 1),
    )
    assert out_held.shared is None and out_formed.held is None
    torch.testing.assert_close(out_held.held, out_formed.weights)
    torch.testing.assert_close(out_held.held.to(parts.dtype) @ parts[2], out_formed.shared)
    torch.testing.assert_close(held.inner_weights, formed.inner_weights)


def test_the_inner_problem_ignores_the_scale_of_the_gradients():
    d, w, c = sdmgrad_direction(HAND_PARTS, None, lam=0.5, lr=0.2, momentum=0.5, n_iter=2)
    d10, w10, c10 = sdmgrad_direction(10 * HAND_PARTS, None, lam=0.5, lr=0.2, momentum=0.5, n_iter=2)
    torch.testing.assert_close(w10, w)
    torch.testing.assert_close(d10, 10 * d)


def test_the_update_in_a_fit_equals_the_rule_on_the_parts_jacobians():
    # one SGD step (lr 0.05) on a batch of 12: parts are rows 0-3 (ξ), 4-7 (ξ′), 8-11 (ζ); the encoder moves by
    # −lr·(J_ζᵀw + λḡ_ζ)/(1 + λ), the heads by −lr·∇ΣLᵢ of the whole batch
    data = make_data(n=12)
    reference = ConflictNet()
    parts, head_grad = _part_jacobians(reference, data.tensors)
    d, w, c = sdmgrad_direction(parts.double(), None, lam=0.3)
    model, strategy = ConflictNet(), SDMGrad()
    trainer(max_steps=1, callbacks=[strategy]).fit(model, loader(data, batch_size=12))
    shared0 = torch.cat([p.detach().flatten() for p in reference.encoder.parameters()])
    heads0 = torch.cat([p.detach().flatten() for p in reference.heads.parameters()])
    shared1 = torch.cat([p.detach().flatten() for p in model.encoder.parameters()])
    heads1 = torch.cat([p.detach().flatten() for p in model.heads.parameters()])
    torch.testing.assert_close(shared1, shared0 - 0.05 * d.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(heads1, heads0 - 0.05 * head_grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(strategy.inner_weights, w, atol=1e-5, rtol=0)
    assert list(strategy.weights.values()) == pytest.approx(c.tolist(), abs=1e-5)


# ------------------------------------------------------------------------------------------ TorchJD
@pytest.mark.parametrize(("lam", "lr"), [(0.3, 10.0), (0.0, 5.0), (2.0, 1.0)])
def test_matches_torchjd_sdmgrad_weighting_over_several_steps(lam, lr):
    from torchjd.aggregation import SDMGradWeighting

    g = torch.Generator().manual_seed(0)
    reference = SDMGradWeighting(lr=lr, momentum=0.5, n_iter=20, lambda_=lam)
    w = None
    for _ in range(6):
        parts = 30 * torch.randn(3, 4, 9, generator=g, dtype=F64)
        expected = reference(cross_gramian(parts[0], parts[1]))  # TorchJD returns c = (w + λ/T)/(1 + λ)
        d, w, c = sdmgrad_direction(parts, w, lam=lam, lr=lr, momentum=0.5, n_iter=20)
        # TorchJD adds 1e-8 to s² (we do not): gradients of scale 30 (s² ≈ 8000) make that negligible
        torch.testing.assert_close(c, expected, atol=1e-9, rtol=0)
        torch.testing.assert_close(d, expected @ parts[2], atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("seed", range(5))
def test_w_stays_on_the_simplex_and_is_permutation_equivariant(seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(4, generator=g)
    w, w_p = None, None
    for _ in range(4):
        parts = torch.randn(3, 4, 6, generator=g, dtype=F64)
        d, w, c = sdmgrad_direction(parts, w)
        d_p, w_p, c_p = sdmgrad_direction(parts[:, perm], w_p)
        assert bool((w >= 0).all()) and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
        assert bool((c >= 0).all()) and float(c.sum()) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(w_p, w[perm])
        torch.testing.assert_close(d_p, d)


@pytest.mark.parametrize("seed", range(3))
def test_no_regularisation_and_identical_parts_give_mgdas_min_norm_point(seed):
    # λ = 0, J_ξ = J_ξ′ = J_ζ = J: the inner problem is min_{w∈Δ} ½‖Jᵀw‖² (MGDA); enough inner steps solve it
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(3, 5, generator=g, dtype=F64)
    d, w, c = sdmgrad_direction(torch.stack([J, J, J]), None, lam=0.0, lr=0.5, momentum=0.5, n_iter=3000)
    expected = mgda_weights(J @ J.T)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(c, w)  # λ = 0: c = w
    torch.testing.assert_close(d, expected @ J, atol=1e-6, rtol=0)


def test_large_regularisation_gives_the_mean_gradient_direction():
    g = torch.Generator().manual_seed(0)
    parts = torch.randn(3, 4, 7, generator=g, dtype=F64)
    mean = parts[2].mean(0)
    for lam in (1e9, math.inf):
        d, w, c = sdmgrad_direction(parts, None, lam=lam)
        torch.testing.assert_close(c, torch.full((4,), 0.25, dtype=F64), atol=1e-8, rtol=0)
        torch.testing.assert_close(d, mean, atol=1e-8, rtol=0)
    assert sdmgrad_coefficients(torch.tensor([1.0, 0.0]), math.inf).tolist() == [0.5, 0.5]


def test_zero_gradients_leave_w_where_it_was():
    # s = 0 (no gradient signal): M is left as it is (0), so the inner steps do not move w
    w0 = _t([0.2, 0.3, 0.5])
    w = sdmgrad_weights(torch.zeros(3, 3, dtype=F64), w0)
    torch.testing.assert_close(w, w0)


# ------------------------------------------------------------------------------------------ fits
def _mean_loss(model: TinyNet, n: int = 48) -> float:
    x, y = make_data(n=n).tensors
    with torch.no_grad():
        return float(sum(model.task_losses((x, y), 0).values()) / 3)


def test_a_fit_trains_and_the_logged_weights_are_the_coefficients():
    model, strategy = ConflictNet(lr=0.02), SDMGrad()
    before = _mean_loss(model)
    trainer(max_epochs=4, callbacks=[strategy]).fit(model, loader(make_data(n=48), batch_size=12))
    assert _mean_loss(model) < 0.8 * before
    c = strategy.weights_tensor()
    assert float(c.sum()) == pytest.approx(1.0, abs=1e-6) and bool((c >= 0).all())
    torch.testing.assert_close(c, sdmgrad_coefficients(strategy.inner_weights, 0.3).float())
    assert float((c - 1 / 3).abs().max()) > 1e-3


def test_a_batch_that_cannot_be_split_into_three_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"SDMGrad takes 3 independent gradient samples.*batch size of at least 3"
    ):
        trainer(max_steps=1, callbacks=[SDMGrad()]).fit(TinyNet(), loader(make_data(n=8), batch_size=2))


def test_a_batch_size_not_divisible_by_three_gives_unequal_parts_and_trains():
    # 10 samples -> parts of 4, 3, 3 (torch.tensor_split); the last batch of 40 % 10 = 0 is full
    model, strategy = ConflictNet(lr=0.02), SDMGrad()
    before = _mean_loss(model, n=40)
    trainer(max_epochs=3, callbacks=[strategy]).fit(model, loader(make_data(n=40), batch_size=10))
    assert _mean_loss(model, n=40) < before
    assert float(strategy.inner_weights.sum()) == pytest.approx(1.0, abs=1e-9) and bool(
        (strategy.inner_weights >= 0).all()
    )


@pytest.mark.parametrize("accumulate", [2, 3])
def test_accumulation_trains_and_solves_once_per_window(accumulate):
    model = ConflictNet(lr=0.02, accumulate_grad_batches=accumulate)
    strategy = SDMGrad()
    seen = []
    original = strategy.compute_direction

    def counting(jacobian, losses):
        seen.append(tuple(jacobian.shape))
        return original(jacobian, losses)

    strategy.compute_direction = counting
    before = _mean_loss(model)
    trainer(max_epochs=4, callbacks=[strategy]).fit(model, loader(make_data(n=48), batch_size=6))
    assert _mean_loss(model) < before
    assert len(seen) == 4 * math.ceil(8 / accumulate) and all(s[:2] == (2, 3) for s in seen)  # ζ held out
    assert float(strategy.weights_tensor().sum()) == pytest.approx(1.0, abs=1e-6)


def _fp16(init_scale: float = 2.0**10) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains(precision):
    model, strategy = ConflictNet(lr=0.02), SDMGrad()
    before = _mean_loss(model)
    kwargs = {"plugins": [_fp16()]} if precision == "16-mixed" else {"precision": "bf16-mixed"}
    trainer(max_epochs=3, callbacks=[strategy], **kwargs).fit(model, loader(make_data(n=48), 12))
    assert _mean_loss(model) < before
    c = strategy.weights_tensor()
    assert bool(torch.isfinite(c).all()) and float(c.sum()) == pytest.approx(1.0, abs=1e-5)


def test_fp16_overflow_skips_the_step_and_leaves_w():
    plugin = _fp16(init_scale=2.0**30)  # the fp16 gradients overflow: the scaler skips the step
    model, strategy = ConflictNet(), SDMGrad()
    before = flat_params(model)
    trainer(max_steps=1, plugins=[plugin], callbacks=[strategy]).fit(model, loader(make_data(n=12), 12))
    assert plugin.scaler.get_scale() < 2.0**30
    assert torch.equal(flat_params(model), before)
    assert strategy.inner_weights is None


# ------------------------------------------------------------------------------------------ state
def _huge_last_part(scale: float = 2e4) -> TensorDataset:
    x, y = make_data(n=12).tensors
    y = y.clone()
    y[8:] *= scale  # only ζ (samples 8..11) overflows in fp16
    return TensorDataset(x, y)


def test_an_overflow_in_the_held_out_part_alone_skips_the_step_and_leaves_w():
    # ζ's Jacobian is not formed, so its overflow shows only in the backward: the scaler skips the step, and w
    # and the logged weights go back to where they were
    plugin = _fp16(init_scale=2.0**6)
    model, strategy = ConflictNet(), SDMGrad()
    before = flat_params(model)
    trainer(max_steps=1, plugins=[plugin], callbacks=[strategy]).fit(model, loader(_huge_last_part(), 12))
    assert plugin.scaler.get_scale() < 2.0**6
    assert torch.equal(flat_params(model), before)
    assert strategy.inner_weights is None and strategy.weights_tensor() is None


class NaNGradientInZeta(ConflictNet):
    """A finite loss whose gradient is NaN on samples 8..11 (ζ of a batch of 12): ``sqrt(0·ŷ)``."""

    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        x, _ = batch
        if batch_idx == 1 and x.shape[0] == 4 and self._part_calls % 3 == 2:
            first = next(iter(losses))
            losses[first] = losses[first] + torch.sqrt(0 * self.encoder(x)).sum()
        self._part_calls += 1
        return losses

    _part_calls = 0


def test_a_discarded_window_restores_w_and_the_weights():
    # nonfinite="skip": batch 1's window is discarded by the module's gradient check (ζ's NaN gradient)
    model, strategy = NaNGradientInZeta(nonfinite="skip"), SDMGrad(lr=0.5)  # w stays inside the simplex
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(strategy.inner_weights.clone())

    with pytest.warns(UserWarning, match="Non-finite gradient at training batch 1"):
        trainer(max_steps=3, callbacks=[strategy, Record()]).fit(model, loader(make_data(n=36), 12))
    assert model.skipped_steps == 1
    torch.testing.assert_close(seen[1], seen[0], atol=0, rtol=0)  # batch 1 left w as batch 0 did
    assert not torch.equal(seen[2], seen[1])


def test_state_is_restored_by_task_name():
    g = torch.Generator().manual_seed(0)
    s = bound(SDMGrad(lr=1.0), ("a", "b", "c"))
    s.compute_direction(torch.randn(3, 3, 5, generator=g), torch.ones(3))
    saved = s.state_dict()
    other = bound(SDMGrad(lr=1.0), ("c", "a", "b"))
    other.load_state_dict(saved)
    torch.testing.assert_close(other.inner_weights, s.inner_weights[[2, 0, 1]])
    nxt = torch.randn(3, 3, 5, generator=g)
    d, c, _, _ = s.compute_direction(nxt, torch.ones(3))
    d_other, c_other, _, _ = other.compute_direction(nxt[:, [2, 0, 1]], torch.ones(3))
    torch.testing.assert_close(d_other, d)
    torch.testing.assert_close(c_other, c[[2, 0, 1]])


def test_state_for_other_tasks_is_refused():
    s = bound(SDMGrad(), ("a", "b", "c"))
    s.compute_direction(torch.randn(3, 3, 4), torch.ones(3))
    with pytest.raises(ValueError, match=r"SDMGrad.*\['a', 'b', 'c'\].*\['a', 'b', 'd'\]"):
        bound(SDMGrad(), ("a", "b", "d")).load_state_dict(s.state_dict())


def test_resume_matches_uninterrupted(tmp_path):
    data = loader(make_data(n=48), batch_size=12)
    straight, s_straight = ConflictNet(optimizer="adam", lr=0.01), SDMGrad()
    trainer(max_epochs=4, callbacks=[s_straight]).fit(straight, data)
    t1 = trainer(max_epochs=2, callbacks=[SDMGrad()])
    t1.fit(ConflictNet(optimizer="adam", lr=0.01), data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = ConflictNet(optimizer="adam", lr=0.01), SDMGrad()
    trainer(max_epochs=4, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.inner_weights, s_straight.inner_weights, atol=1e-6, rtol=0)
    state = torch.load(tmp_path / "half.ckpt", weights_only=True)["callbacks"]  # tensors and primitives only
    assert any("SDMGrad" in key for key in state)


def test_mid_epoch_resume_by_steps(tmp_path):
    # every batch is the same 12 rows, so a mid-epoch resume (the loader restarts) sees the same data
    x, y = make_data(n=12).tensors
    same = TensorDataset(x.repeat(4, 1), y.repeat(4, 1))

    def run(max_steps, ckpt=None):
        net, strategy = ConflictNet(optimizer="adam", lr=0.01), SDMGrad(lr=1.0)
        t = trainer(max_epochs=-1, max_steps=max_steps, callbacks=[strategy])
        t.fit(net, loader(same, batch_size=12), ckpt_path=ckpt)
        return t, net, strategy

    _, straight, s_straight = run(7)
    t_half, _, _ = run(2)
    t_half.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed, s_resumed = run(7, tmp_path / "mid.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.inner_weights, s_straight.inner_weights, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    # 2 ranks × 6 (3 divides the per-rank batch) ≡ 1 process × 12: the ranks' parts j make the single's part j
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, lambda: SDMGrad(lr=1.0), epochs=3, batch_size=6, n=48, tag="sdmgrad"
    )
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    w0, w1 = rank0["state"]["state"]["method"]["w"], rank1["state"]["state"]["method"]["w"]
    assert torch.equal(w0, w1)
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=0)
    torch.testing.assert_close(w0, single["state"]["state"]["method"]["w"], atol=1e-5, rtol=0)
    assert any(abs(w - 1 / 3) > 1e-3 for w in single["weights"].values())


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lam=-0.1), "lam must be a number >= 0.*-0.1"),
        (dict(lam=math.nan), "lam.*nan"),
        (dict(lam=True), "lam.*True"),
        (dict(lr=0.0), "lr must be a finite number > 0.*0.0"),
        (dict(lr=math.inf), "lr.*inf"),
        (dict(momentum=1.0), r"momentum must be a number in \[0, 1\).*1.0"),
        (dict(momentum=-0.5), "momentum.*-0.5"),
        (dict(n_iter=0), "n_iter must be a positive integer.*0"),
        (dict(n_iter=2.5), "n_iter.*2.5"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        SDMGrad(**kwargs)
    assert "for SDMGrad" in str(err.value)


def test_functional_bad_input():
    with pytest.raises(ValueError, match=r"SDMGrad needs the Jacobians \[3, T, P\].*\(3, 4\)"):
        sdmgrad_direction(torch.zeros(3, 4), None)
    with pytest.raises(ValueError, match=r"w must have shape \[3\]"):
        sdmgrad_weights(torch.zeros(3, 3), torch.ones(2) / 2)
    with pytest.raises(ValueError, match=r"M must be a \[T, T\] matrix"):
        sdmgrad_weights(torch.zeros(3, 2), None)


def test_inf_lambda_is_accepted_by_the_strategy():
    s = bound(SDMGrad(lam=math.inf), ("a", "b"))
    parts = torch.randn(3, 2, 4)
    d, c, heads, held = s.compute_direction(parts, torch.ones(2))
    assert held is None  # all three parts given: the direction itself
    torch.testing.assert_close(d, parts[2].mean(0))
    assert c.tolist() == [0.5, 0.5] and heads.tolist() == [1.0, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host synchronisation")
def test_the_inner_loop_runs_on_the_device_without_host_synchronisation():
    parts = torch.randn(3, 4, 1000, device="cuda")
    w = torch.full((4,), 0.25, device="cuda", dtype=F64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d, w, c = sdmgrad_direction(parts, w, n_iter=20)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert d.device.type == "cuda" and w.device.type == "cuda" and w.dtype == F64


@pytest.mark.parametrize("seed", range(6))
def test_the_cpu_inner_loop_in_numpy_equals_the_torch_loop(seed):
    # the CPU runs the inner projected SGD in NumPy; accelerators run the torch loop: the same steps
    from lightning_mtl.functional.sdmgrad import _inner_sgd, _inner_sgd_numpy

    g = torch.Generator().manual_seed(seed)
    T = [2, 3, 5, 10, 40, 1][seed]
    A = torch.randn(T, T, generator=g, dtype=F64)
    b = torch.randn(T, generator=g, dtype=F64) * 0.1
    w = torch.rand(T, generator=g, dtype=F64)
    w = w / w.sum()
    for lr, momentum, n_iter in ((10.0, 0.5, 20), (0.3, 0.0, 7), (50.0, 0.9, 3)):
        expected = _inner_sgd(A, b, w, lr, momentum, n_iter)
        got = torch.from_numpy(_inner_sgd_numpy(A.numpy(), b.numpy(), w.numpy(), lr, momentum, n_iter))
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
        assert abs(float(got.sum()) - 1.0) < 1e-12 and bool((got >= 0).all())
