"""MoDo (Chen, Fernando, Ying & Chen, NeurIPS 2023, arXiv:2305.20057): hand-computed steps, TorchJD, invariants,
the batch parts, state by task name, resume, DDP, AMP, accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ConflictNet, TinyNet, bound, ddp_parity_records, flat_params, loader, make_data, trainer
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import TensorDataset

from lightning_mtl.functional.mgda import mgda_weights
from lightning_mtl.functional.modo import (
    cross_gramian,
    modo_direction,
    modo_step,
    modo_weights,
    project_onto_simplex,
)
from lightning_mtl.strategies.modo import MoDo

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
        losses = model.task_losses((xs, ys), 0)
        rows = [
            torch.cat([g.flatten() for g in torch.autograd.grad(L, shared, retain_graph=True)])
            for L in losses.values()
        ]
        parts.append(torch.stack(rows))
    whole = sum(model.task_losses((x, y), 0).values())
    head_grad = torch.cat([g.flatten() for g in torch.autograd.grad(whole, heads)])
    return torch.stack(parts), head_grad


# ------------------------------------------------------------------------------------------ hand-computed
def test_hand_computed_two_steps_from_given_part_jacobians():
    # parts: J₀ = I, J₁ = diag(2, 1), J₂ = [[1, 1], [0, 2]]  ->  M = J₀J₁ᵀ = diag(2, 1);  γ = 0.1, ρ = 0.1
    parts = torch.stack([_t([[1, 0], [0, 1]]), _t([[2, 0], [0, 1]]), _t([[1, 1], [0, 2]])])
    # step 1 from λ = (½, ½): Mλ + ρλ = (1, ½) + (0.05, 0.05) = (1.05, 0.55)
    #   λ − γ(...) = (0.395, 0.445), sum 0.84 -> θ = (0.84 − 1)/2 = −0.08 -> λ⁺ = (0.475, 0.525)
    #   d = J₂ᵀλ⁺ = 0.475·(1, 1) + 0.525·(0, 2) = (0.475, 1.525)
    d, lam = modo_direction(parts, None, gamma=0.1, rho=0.1)
    torch.testing.assert_close(lam, _t([0.475, 0.525]))
    torch.testing.assert_close(d, _t([0.475, 1.525]))
    # step 2 from λ = (0.475, 0.525): Mλ + ρλ = (0.95, 0.525) + (0.0475, 0.0525) = (0.9975, 0.5775)
    #   λ − γ(...) = (0.37525, 0.46725), sum 0.8425 -> θ = −0.07875 -> λ⁺ = (0.454, 0.546)
    d, lam = modo_direction(parts, lam, gamma=0.1, rho=0.1)
    torch.testing.assert_close(lam, _t([0.454, 0.546]))
    torch.testing.assert_close(d, _t([0.454, 0.454 + 2 * 0.546]))
    # the λ step alone (the third sample held out by the strategy): from parts 0 and 1
    torch.testing.assert_close(modo_step(parts[:2], None, gamma=0.1, rho=0.1), _t([0.475, 0.525]))


def test_three_samples_with_the_third_held_out_give_lambda_as_its_coefficients():
    parts = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(3))
    held, formed = bound(MoDo(samples=3), tuple("abcd")), bound(MoDo(samples=3), tuple("abcd"))
    out_held, out_formed = (
        held.compute_direction(parts[:2], torch.ones(4)),
        formed.compute_direction(parts, 1),
    )
    assert out_held.shared is None and out_formed.held is None
    torch.testing.assert_close(out_held.held, formed.lambdas)
    torch.testing.assert_close(out_held.held.to(parts.dtype) @ parts[2], out_formed.shared)
    assert MoDo(samples=3).holds_out_last_part and not MoDo().holds_out_last_part


def test_hand_computed_step_that_reaches_a_vertex():
    # M = diag(4, 0), γ = 1, ρ = 0: λ − Mλ = (½ − 2, ½) = (−1.5, 0.5)
    # sorted u = (0.5, −1.5), Σu − 1 = (−0.5, −2): j = 1: 0.5 + 0.5 > 0; j = 2: −1.5 + 1 < 0 -> ρ = 1, θ = −0.5
    # -> λ⁺ = (max(−1.5 + 0.5, 0), 0.5 + 0.5) = (0, 1)
    lam = modo_weights(_t([[4, 0], [0, 0]]), _t([0.5, 0.5]), gamma=1.0, rho=0.0)
    assert lam.tolist() == [0.0, 1.0]


def test_hand_computed_two_sample_step():
    # the paper's update: λ⁺ from J₀J₁ᵀ as above, then d = ½(J₀ + J₁)ᵀλ⁺
    # J₀ = I, J₁ = diag(2, 1): λ⁺ = (0.475, 0.525) (first test); ½(J₀ + J₁) = diag(1.5, 1) -> d = (0.7125, 0.525)
    parts = torch.stack([_t([[1, 0], [0, 1]]), _t([[2, 0], [0, 1]])])
    d, lam = modo_direction(parts, None, gamma=0.1, rho=0.1)
    torch.testing.assert_close(lam, _t([0.475, 0.525]))
    torch.testing.assert_close(d, _t([0.7125, 0.525]))


@pytest.mark.parametrize("samples", [2, 3])
def test_the_update_in_a_fit_equals_the_rule_on_the_parts_jacobians(samples):
    # one SGD step (lr 0.05) on a batch of 12: parts are rows 0-5, 6-11 (samples=2) or 0-3, 4-7, 8-11 (3); the
    # encoder moves by −lr·d with λ⁺ from J₀J₁ᵀ and d = ½(J₀ + J₁)ᵀλ⁺ or J₂ᵀλ⁺, the heads by −lr·∇ΣLᵢ of the
    # whole batch
    data = make_data(n=12)
    reference = ConflictNet()
    parts, head_grad = _part_jacobians(reference, data.tensors, k=samples)
    d, lam = modo_direction(parts.double(), None, gamma=0.5, rho=0.1)
    model, strategy = ConflictNet(), MoDo(gamma=0.5, rho=0.1, samples=samples)
    trainer(max_steps=1, callbacks=[strategy]).fit(model, loader(data, batch_size=12))
    shared0 = torch.cat([p.detach().flatten() for p in reference.encoder.parameters()])
    heads0 = torch.cat([p.detach().flatten() for p in reference.heads.parameters()])
    shared1 = torch.cat([p.detach().flatten() for p in model.encoder.parameters()])
    heads1 = torch.cat([p.detach().flatten() for p in model.heads.parameters()])
    torch.testing.assert_close(shared1, shared0 - 0.05 * d.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(heads1, heads0 - 0.05 * head_grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(strategy.lambdas, lam, atol=1e-6, rtol=0)
    assert list(strategy.weights.values()) == pytest.approx(lam.tolist(), abs=1e-6)
    assert float((lam - 1 / 3).abs().max()) > 1e-3


# ------------------------------------------------------------------------------------------ TorchJD
@pytest.mark.parametrize("samples", [2, 3])
def test_matches_torchjd_modo_weighting_over_several_steps(samples):
    # TorchJD's two examples: two batches (the parameter step on the mean of both batches' losses, "MoDo as
    # described in the paper") and three (the parameter step on the third batch)
    from torchjd.aggregation import MoDoWeighting

    g = torch.Generator().manual_seed(0)
    reference = MoDoWeighting(gamma=0.05, rho=0.1)
    lam = None
    for _ in range(6):
        parts = torch.randn(samples, 4, 9, generator=g, dtype=F64)
        M = cross_gramian(parts[0], parts[1])
        expected = reference(M)
        d, lam = modo_direction(parts, lam, gamma=0.05, rho=0.1)
        torch.testing.assert_close(lam, expected, atol=1e-12, rtol=0)
        step = parts[2] if samples == 3 else (parts[0] + parts[1]) / 2.0
        torch.testing.assert_close(d, expected @ step, atol=1e-12, rtol=0)


def test_projection_matches_torchjd_and_the_moco_projection():
    from torchjd.aggregation._utils.simplex import project_onto_simplex as torchjd_projection

    from lightning_mtl.functional.moco import project_simplex

    g = torch.Generator().manual_seed(1)
    v = torch.randn(200, 5, generator=g, dtype=F64) * 3
    ours = project_onto_simplex(v)  # batched over the leading dimension
    torch.testing.assert_close(ours, torch.stack([torchjd_projection(row) for row in v]), atol=1e-12, rtol=0)
    torch.testing.assert_close(ours, torch.stack([project_simplex(row) for row in v]), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("seed", range(5))
def test_projection_is_on_the_simplex_and_the_closest_point(seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(7, generator=g, dtype=F64) * 2
    p = project_onto_simplex(v)
    assert bool((p >= 0).all()) and float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    # optimality: ⟨v − p, q − p⟩ ≤ 0 for every q in Δ (checked at the vertices)
    assert float(((v - p) @ (torch.eye(7, dtype=F64) - p).T).max()) <= 1e-12
    assert torch.equal(project_onto_simplex(p), p) or torch.allclose(project_onto_simplex(p), p, atol=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_lambda_stays_on_the_simplex_and_is_permutation_equivariant(seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(4, generator=g)
    lam, lam_p = None, None
    for _ in range(5):
        parts = torch.randn(3, 4, 6, generator=g, dtype=F64)
        d, lam = modo_direction(parts, lam, gamma=0.2, rho=0.1)
        d_p, lam_p = modo_direction(parts[:, perm], lam_p, gamma=0.2, rho=0.1)
        assert bool((lam >= 0).all()) and float(lam.sum()) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(lam_p, lam[perm])
        torch.testing.assert_close(d_p, d)


def test_identical_parts_and_no_regulariser_converge_to_mgdas_min_norm_point():
    # with J₀ = J₁ the λ step is projected gradient descent on ½‖Jᵀλ‖²: it converges to MGDA's weights
    g = torch.Generator().manual_seed(3)
    J = torch.randn(3, 5, generator=g, dtype=F64)
    G = J @ J.T
    lam = None
    for _ in range(4000):
        _, lam = modo_direction(torch.stack([J, J, J]), lam, gamma=0.5 / float(G.trace()), rho=0.0)
    torch.testing.assert_close(lam, mgda_weights(G), atol=1e-6, rtol=0)


def test_lambda_does_not_move_when_the_samples_are_orthogonal_and_rho_is_zero():
    # J₀J₁ᵀ = 0 (independent samples that carry no common signal): λ stays at 1/T
    parts = torch.stack([_t([[1, 0, 0], [0, 1, 0]]), _t([[0, 0, 1], [0, 0, 2]]), _t([[1, 2, 3], [4, 5, 6]])])
    d, lam = modo_direction(parts, None, gamma=1.0, rho=0.0)
    assert lam.tolist() == [0.5, 0.5]
    torch.testing.assert_close(d, _t([2.5, 3.5, 4.5]))


# ------------------------------------------------------------------------------------------ fits
def _mean_loss(model: TinyNet, n: int = 48) -> float:
    x, y = make_data(n=n).tensors
    with torch.no_grad():
        return float(sum(model.task_losses((x, y), 0).values()) / 3)


def test_a_fit_trains_and_the_logged_weights_are_lambda():
    model, strategy = ConflictNet(lr=0.02), MoDo(gamma=0.5)
    before = _mean_loss(model)
    trainer(max_epochs=4, callbacks=[strategy]).fit(model, loader(make_data(n=48), batch_size=12))
    assert _mean_loss(model) < 0.8 * before
    w = strategy.weights_tensor()
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6) and bool((w >= 0).all())
    torch.testing.assert_close(w, strategy.lambdas.float())
    assert float((w - 1 / 3).abs().max()) > 1e-3


@pytest.mark.parametrize("samples", [2, 3])
def test_a_batch_that_cannot_be_split_into_the_samples_is_a_clear_error(samples):
    with pytest.raises(
        ValueError,
        match=rf"MoDo takes {samples} independent gradient samples.*batch size of at least {samples}",
    ):
        trainer(max_steps=1, callbacks=[MoDo(samples=samples)]).fit(
            TinyNet(), loader(make_data(n=8), batch_size=samples - 1)
        )


def test_a_batch_size_not_divisible_by_three_gives_unequal_parts_and_trains():
    # 10 samples -> parts of 4, 3, 3 (torch.tensor_split); the last batch of 40 % 10 = 0 is full
    model, strategy = ConflictNet(lr=0.02), MoDo()
    before = _mean_loss(model, n=40)
    trainer(max_epochs=3, callbacks=[strategy]).fit(model, loader(make_data(n=40), batch_size=10))
    assert _mean_loss(model, n=40) < before
    assert float(strategy.lambdas.sum()) == pytest.approx(1.0, abs=1e-9) and bool(
        (strategy.lambdas >= 0).all()
    )


@pytest.mark.parametrize("accumulate", [2, 3])
def test_accumulation_trains_and_updates_lambda_once_per_window(accumulate):
    model = ConflictNet(lr=0.02, accumulate_grad_batches=accumulate)
    strategy = MoDo(gamma=0.5)
    seen = []
    original = strategy.compute_direction

    def counting(jacobian, losses):
        seen.append(tuple(jacobian.shape))
        return original(jacobian, losses)

    strategy.compute_direction = counting
    before = _mean_loss(model)
    trainer(max_epochs=4, callbacks=[strategy]).fit(model, loader(make_data(n=48), batch_size=6))
    assert _mean_loss(model) < before
    assert len(seen) == 4 * math.ceil(8 / accumulate) and all(s[:2] == (2, 3) for s in seen)
    assert float(strategy.weights_tensor().sum()) == pytest.approx(1.0, abs=1e-6)


def _fp16(init_scale: float = 2.0**10) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_and_matches_fp32(precision):
    reference = MoDo(gamma=0.5)
    trainer(max_epochs=2, callbacks=[reference]).fit(ConflictNet(lr=0.02), loader(make_data(n=48), 12))
    model, strategy = ConflictNet(lr=0.02), MoDo(gamma=0.5)
    before = _mean_loss(model)
    kwargs = {"plugins": [_fp16()]} if precision == "16-mixed" else {"precision": "bf16-mixed"}
    trainer(max_epochs=2, callbacks=[strategy], **kwargs).fit(model, loader(make_data(n=48), 12))
    assert _mean_loss(model) < before
    w = strategy.weights_tensor()
    assert bool(torch.isfinite(w).all()) and float(w.sum()) == pytest.approx(1.0, abs=1e-5)
    tol = 2e-3 if precision == "16-mixed" else 3e-2
    torch.testing.assert_close(w, reference.weights_tensor(), atol=tol, rtol=tol)


def test_fp16_overflow_skips_the_step_and_leaves_lambda():
    plugin = _fp16(init_scale=2.0**30)  # the fp16 gradients overflow: the scaler skips the step
    model, strategy = ConflictNet(), MoDo()
    before = flat_params(model)
    trainer(max_steps=1, plugins=[plugin], callbacks=[strategy]).fit(model, loader(make_data(n=12), 12))
    assert plugin.scaler.get_scale() < 2.0**30
    assert torch.equal(flat_params(model), before)
    assert strategy.lambdas is None


# ------------------------------------------------------------------------------------------ state
def test_state_is_restored_by_task_name():
    g = torch.Generator().manual_seed(0)
    s = bound(MoDo(gamma=0.5), ("a", "b", "c"))
    parts = torch.randn(3, 3, 5, generator=g)
    s.compute_direction(parts, torch.ones(3))
    saved = s.state_dict()
    other = bound(MoDo(gamma=0.5), ("c", "a", "b"))
    other.load_state_dict(saved)
    torch.testing.assert_close(other.lambdas, s.lambdas[[2, 0, 1]])
    nxt = torch.randn(3, 3, 5, generator=g)
    d = s.compute_direction(nxt, torch.ones(3)).shared
    d_other = other.compute_direction(nxt[:, [2, 0, 1]], torch.ones(3)).shared
    torch.testing.assert_close(d_other, d)
    torch.testing.assert_close(other.lambdas, s.lambdas[[2, 0, 1]])


def test_state_for_other_tasks_is_refused():
    s = bound(MoDo(), ("a", "b", "c"))
    s.compute_direction(torch.randn(3, 3, 4), torch.ones(3))
    with pytest.raises(ValueError, match=r"MoDo.*\['a', 'b', 'c'\].*\['a', 'b', 'd'\]"):
        bound(MoDo(), ("a", "b", "d")).load_state_dict(s.state_dict())


def test_resume_matches_uninterrupted(tmp_path):
    data = loader(make_data(n=48), batch_size=12)
    straight, s_straight = ConflictNet(optimizer="adam", lr=0.01), MoDo(gamma=0.5)
    trainer(max_epochs=4, callbacks=[s_straight]).fit(straight, data)
    t1 = trainer(max_epochs=2, callbacks=[MoDo(gamma=0.5)])
    t1.fit(ConflictNet(optimizer="adam", lr=0.01), data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = ConflictNet(optimizer="adam", lr=0.01), MoDo(gamma=0.5)
    trainer(max_epochs=4, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.lambdas, s_straight.lambdas, atol=1e-6, rtol=0)
    assert float((s_straight.lambdas - 1 / 3).abs().max()) > 1e-3
    state = torch.load(tmp_path / "half.ckpt", weights_only=True)["callbacks"]  # tensors and primitives only
    assert any("MoDo" in key for key in state)


def test_mid_epoch_resume_by_steps(tmp_path):
    # every batch is the same 12 rows, so a mid-epoch resume (the loader restarts) sees the same data
    x, y = make_data(n=12).tensors
    same = TensorDataset(x.repeat(4, 1), y.repeat(4, 1))

    def run(max_steps, ckpt=None):
        net, strategy = ConflictNet(optimizer="adam", lr=0.01), MoDo(gamma=0.5)
        t = trainer(max_epochs=-1, max_steps=max_steps, callbacks=[strategy])
        t.fit(net, loader(same, batch_size=12), ckpt_path=ckpt)
        return t, net, strategy

    _, straight, s_straight = run(7)
    t_half, _, _ = run(2)
    t_half.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed, s_resumed = run(7, tmp_path / "mid.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.lambdas, s_straight.lambdas, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.ddp_extra  # MoDo with partial labels (test_partial_batch_parts.py) and SDMGrad's full-label test run
@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    # 2 ranks × 6 (3 divides the per-rank batch) ≡ 1 process × 12: the ranks' parts j make the single's part j
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, lambda: MoDo(gamma=0.5), epochs=3, batch_size=6, n=48, tag="modo"
    )
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    l0, l1 = rank0["state"]["state"]["method"]["lambda"], rank1["state"]["state"]["method"]["lambda"]
    assert torch.equal(l0, l1)
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=0)
    torch.testing.assert_close(l0, single["state"]["state"]["method"]["lambda"], atol=1e-5, rtol=0)
    assert any(abs(w - 1 / 3) > 1e-3 for w in single["weights"].values())


@pytest.mark.ddp_extra  # the same mechanism as MoCo's local-sync / MoDo's and SDMGrad's DDP test
@pytest.mark.timeout(240)
def test_local_sync_keeps_every_rank_identical(tmp_path):
    """sync="local": each rank's λ step uses its own parts and λ is averaged over ranks after each step."""
    _, rank0, rank1 = ddp_parity_records(
        tmp_path, lambda: MoDo(gamma=0.5, sync="local"), epochs=2, batch_size=6, n=48, tag="modo-local"
    )
    assert torch.equal(rank0["params"], rank1["params"])
    l0, l1 = rank0["state"]["state"]["method"]["lambda"], rank1["state"]["state"]["method"]["lambda"]
    assert torch.equal(l0, l1) and float(l0.sum()) == pytest.approx(1.0, abs=1e-9)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(gamma=0.0), "gamma.*> 0.*0.0"),
        (dict(gamma=-1.0), "gamma.*-1.0"),
        (dict(gamma=math.inf), "gamma.*inf"),
        (dict(gamma=True), "gamma.*True"),
        (dict(rho=-0.1), "rho.*>= 0.*-0.1"),
        (dict(rho=math.nan), "rho.*nan"),
        (dict(samples=1), "samples must be 2.*or 3.*got 1"),
        (dict(samples=4), "samples must be 2.*got 4"),
        (dict(samples=True), "samples.*got True"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=f"MoDo {match}"):
        MoDo(**kwargs)


def test_functional_bad_input():
    with pytest.raises(ValueError, match=r"MoDo needs the Jacobians \[2 or 3, T, P\].*\(4, 3, 4\)"):
        modo_direction(torch.zeros(4, 3, 4), None)
    with pytest.raises(ValueError, match=r"lam must have shape \[3\]"):
        modo_weights(torch.zeros(3, 3), torch.ones(2) / 2)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0 for MoDo"):
        modo_weights(torch.zeros(3, 3), None, gamma=0.0)
    with pytest.raises(ValueError, match="same tasks and parameters"):
        cross_gramian(torch.zeros(3, 4), torch.zeros(2, 4))


def test_no_shared_parameters_is_a_clear_error():
    class NoShared(TinyNet):
        def shared_parameters(self):
            return None

    with pytest.raises(ValueError, match=r"MoDo needs the shared parameters"):
        trainer(max_steps=1, callbacks=[MoDo()]).fit(NoShared(), loader(make_data(n=12), 12))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host synchronisation")
def test_the_step_runs_on_the_device_without_host_synchronisation():
    parts = torch.randn(3, 4, 1000, device="cuda")
    lam = torch.full((4,), 0.25, device="cuda", dtype=F64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d, lam = modo_direction(parts, lam, gamma=0.1, rho=0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert d.device.type == "cuda" and lam.device.type == "cuda"


class DeadTaskNet(TinyNet):
    """Task c's loss does not reach the shared encoder (its head reads a detached representation)."""

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        out = {
            t: torch.nn.functional.mse_loss(self.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate("ab")
        }
        out["c"] = torch.nn.functional.mse_loss(self.heads["c"](z.detach()).squeeze(1), y[:, 2])
        return out


def test_a_task_whose_parts_never_reach_the_shared_parameters_warns_once():
    with pytest.warns(RuntimeWarning, match="'c' has a zero gradient") as record:
        trainer(max_epochs=2, callbacks=[MoDo()]).fit(DeadTaskNet(), loader(make_data(n=32), batch_size=8))
    assert sum("zero gradient" in str(w.message) for w in record) == 1
