"""MoCo (Fernando et al., ICLR 2023, arXiv:2210.12624): hand-computed steps, simplex projection, invariants
(λ on the simplex, MGDA limit), the update in a fit, state by task name, resume, DDP, AMP, accumulation.

TorchJD 0.18 has no MoCo (checked: ``torchjd.aggregation`` has MoDo, SDMGrad, ... but no MoCo): no
differential test."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import (
    ConflictNet,
    ScalarNet,
    bound,
    ddp_parity_records,
    dummy_loader,
    flat_params,
    loader,
    make_data,
    trainer,
)
from lightning.pytorch.plugins import MixedPrecision

from lightning_mtl.functional import gramian
from lightning_mtl.functional.mgda import mgda_weights
from lightning_mtl.functional.moco import MoCoState, loss_norm_gradients, moco_step, project_simplex
from lightning_mtl.strategies.moco import MoCo

F64 = torch.float64


def _J(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ------------------------------------------------------------------------------------------ projection
def test_project_simplex_hand_computed():
    # inside the simplex: unchanged
    torch.testing.assert_close(project_simplex(_J([0.2, 0.3, 0.5])), _J([0.2, 0.3, 0.5]))
    # (0.4, 0.3, 0.1): sum 0.8, all kept: θ = (0.8 − 1)/3 = −1/15, add 1/15 to each
    torch.testing.assert_close(project_simplex(_J([0.4, 0.3, 0.1])), _J([0.4, 0.3, 0.1]) + 1 / 15)
    # (2, 0): u − (cumsum − 1)/j = (2 − 1, 0 − 0.5) -> ρ = 1, θ = 1 -> (1, 0)
    torch.testing.assert_close(project_simplex(_J([2.0, 0.0])), _J([1.0, 0.0]))
    # (0.65, −0.1): (0.65 + 0.35, −0.1 + 0.225) both > 0 -> ρ = 2, θ = −0.45/2 -> (0.875, 0.125)
    torch.testing.assert_close(project_simplex(_J([0.65, -0.1])), _J([0.875, 0.125]))
    with pytest.raises(ValueError, match="finite"):
        project_simplex(_J([math.nan, 0.0]))


@pytest.mark.parametrize("seed", range(10))
def test_project_simplex_meets_the_optimality_conditions(seed):
    # w = Π_Δ(v) ⇔ w ∈ Δ and v − w = θ·1 on the support, v − w ≤ θ off it (KKT of min ½‖w − v‖²)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(6, generator=g, dtype=F64) * 3
    w = project_simplex(v)
    assert bool((w >= 0).all()) and float(w.sum()) == pytest.approx(1.0)
    support = w > 0
    theta = (v - w)[support]
    torch.testing.assert_close(theta, theta[0].expand_as(theta))
    assert bool(((v - w)[~support] <= theta[0] + 1e-12).all())


# ------------------------------------------------------------------------------------------ hand-computed
def test_hand_computed_two_steps_with_a_2x3_jacobian():
    # β = 0.5, σβ = 1 (βₖ = 0.5/k), γ = 0.1, σγ = 1 (γₖ = 0.1/k), ρ = 0; Y₀ = 0, λ₀ = (½, ½)
    kw = dict(beta=0.5, beta_sigma=1.0, gamma=0.1, gamma_sigma=1.0)
    # step 1 (k = 1): J = [[1, 0, 0], [0, 2, 0]] -> Y = 0.5·J = [[0.5, 0, 0], [0, 1, 0]], YYᵀ = diag(0.25, 1)
    #   λ − 0.1·YYᵀλ = (0.5 − 0.0125, 0.5 − 0.05) = (0.4875, 0.45): sum 0.9375, θ = −0.03125
    #   λ = (0.51875, 0.48125); direction = 0.51875·(0.5, 0, 0) + 0.48125·(0, 1, 0)
    first = moco_step(_J([[1, 0, 0], [0, 2, 0]]), **kw)
    torch.testing.assert_close(first.state.tracked, _J([[0.5, 0, 0], [0, 1, 0]]))
    torch.testing.assert_close(first.weights, _J([0.51875, 0.48125]))
    torch.testing.assert_close(first.direction, _J([0.259375, 0.48125, 0.0]))
    assert first.state.step == 1
    # step 2 (k = 2, β₂ = 0.25, γ₂ = 0.05): J = [[0, 0, 4], [0, 2, 0]]
    #   Y = 0.75·Y + 0.25·J = [[0.375, 0, 1], [0, 1.25, 0]], YYᵀ = diag(1.140625, 1.5625)
    #   YYᵀλ = (0.59169921875, 0.751953125); λ − 0.05·YYᵀλ = (0.4891650390625, 0.44365234375)
    #   sum 0.9328173828125, θ = −0.03359130859375 -> λ = (0.52275634765625, 0.47724365234375)
    second = moco_step(_J([[0, 0, 4], [0, 2, 0]]), first.state, **kw)
    torch.testing.assert_close(second.state.tracked, _J([[0.375, 0, 1], [0, 1.25, 0]]))
    lam = _J([0.52275634765625, 0.47724365234375])
    torch.testing.assert_close(second.weights, lam)
    torch.testing.assert_close(second.direction, _J([0.375 * lam[0], 1.25 * lam[1], lam[0]]))
    assert second.state.step == 2


def test_hand_computed_through_the_strategy_with_ridge_and_softmax():
    # ρ = 1, softmax instead of Π_Δ, β = 1 and σ = 0 (Y = J): step 1 with J = [[1, 0, 0], [0, 2, 0]]
    #   (YYᵀ + I)λ = (2·0.5, 5·0.5) = (1, 2.5); λ − 0.1·(1, 2.5) = (0.4, 0.25); softmax -> (e^0.15, 1)/(e^0.15 + 1)
    s = bound(MoCo(beta=1.0, beta_sigma=0.0, gamma=0.1, gamma_sigma=0.0, rho=1.0, projection="softmax"))
    out = s.compute_direction(torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]), torch.ones(2))
    a = math.exp(0.15) / (math.exp(0.15) + 1)
    torch.testing.assert_close(out.weights, torch.tensor([a, 1 - a]))
    torch.testing.assert_close(out.shared, torch.tensor([a, 2 * (1 - a), 0.0]))
    assert out.heads.tolist() == [1.0, 1.0]  # the task-specific parameters get the plain ∇ΣLᵢ
    assert s.updates == 1


def test_loss_norm_sets_each_gradient_norm_to_its_loss():
    # g = (3, 4) (norm 5), L = 2 -> (1.2, 1.6); g = (0, 0.5), L = 4 -> (0, 4)
    G = loss_norm_gradients(_J([[3, 4], [0, 0.5]]), _J([2.0, 4.0]))
    torch.testing.assert_close(G, _J([[1.2, 1.6], [0.0, 4.0]]), atol=1e-7, rtol=0)
    out = moco_step(_J([[3, 4], [0, 0.5]]), losses=_J([2.0, 4.0]), normalize="loss_norm", beta=1.0)
    torch.testing.assert_close(out.state.tracked, G)
    with pytest.raises(ValueError, match=r"normalize='loss_norm' needs the task losses as a \[2\] tensor"):
        moco_step(_J([[3, 4], [0, 0.5]]), normalize="loss_norm")


def test_hand_computed_update_in_a_fit():
    # ScalarNet: θ₀ = 1, L = (θ², 2(θ − 3)²), g = (2θ, 4(θ − 3)), lr 0.1; β = 0.5/k, γ = 0.1/k.
    # step 1: g = (2, −8): Y = (1, −4), YYᵀ = [[1, −4], [−4, 16]], YYᵀλ₀ = (−1.5, 6)
    #   λ₀ − 0.1·(−1.5, 6) = (0.65, −0.1) -> Π_Δ = (0.875, 0.125); d = 0.875 − 0.5 = 0.375; θ₁ = 0.9625
    net = ScalarNet(lr=0.1)
    strategy = MoCo(beta=0.5, beta_sigma=1.0, gamma=0.1, gamma_sigma=1.0)
    trainer(max_steps=2, max_epochs=-1, callbacks=[strategy]).fit(net, dummy_loader(2))
    theta1 = 1 - 0.1 * 0.375
    # step 2 (β₂ = 0.25, γ₂ = 0.05), the same recurrences in numpy
    y = 0.75 * np.array([1.0, -4.0]) + 0.25 * np.array([2 * theta1, 4 * (theta1 - 3)])
    v = np.array([0.875, 0.125]) - 0.05 * np.outer(y, y) @ np.array([0.875, 0.125])
    lam = v - (v.sum() - 1) / 2  # both entries stay positive (checked below)
    assert bool((lam > 0).all())
    assert net.theta.item() == pytest.approx(theta1 - 0.1 * float(lam @ y), abs=1e-6)
    assert list(strategy.weights.values()) == pytest.approx(lam.tolist(), abs=1e-6)
    assert strategy.updates == 2


def test_update_equals_the_functional_rule_and_heads_get_the_plain_gradient():
    data = make_data(n=16)
    net = ConflictNet(lr=0.1)
    reference = copy.deepcopy(net)
    trainer(max_steps=1, callbacks=[MoCo()]).fit(net, loader(data, batch_size=16))
    x, y = data.tensors
    losses = reference.task_losses((x, y), 0)
    shared = list(reference.encoder.parameters())
    J = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(L, shared, retain_graph=True)])
                     for L in losses.values()])  # fmt: skip
    expected = moco_step(J.double()).direction.float()
    moved = torch.cat(
        [(a - b).flatten() for a, b in zip(reference.encoder.parameters(), net.encoder.parameters())]
    )
    torch.testing.assert_close(moved, 0.1 * expected, atol=1e-6, rtol=1e-5)
    for name, L in losses.items():  # the heads: −lr·∇Lᵢ (weight 1, not λᵢ)
        head, new = reference.heads[name], net.heads[name]
        grads = torch.autograd.grad(L, list(head.parameters()), retain_graph=True)
        for p, q, g in zip(head.parameters(), new.parameters(), grads):
            torch.testing.assert_close(p - q, 0.1 * g, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("projection", ["simplex", "softmax"])
def test_lambda_stays_on_the_simplex(projection):
    g = torch.Generator().manual_seed(0)
    state = None
    for _ in range(20):
        J = torch.randn(4, 7, generator=g, dtype=F64) * 5
        out = moco_step(J, state, gamma=1.0, gamma_sigma=0.0, projection=projection)
        state = out.state
        assert bool((out.weights >= 0).all()) and float(out.weights.sum()) == pytest.approx(1.0)
        torch.testing.assert_close(out.direction, out.weights @ out.state.tracked)


@pytest.mark.parametrize("seed", range(4))
def test_without_tracking_and_a_constant_step_lambda_converges_to_mgda(seed):
    # β = 1, σβ = 0: Y = J at every step; a fixed J and a constant γ < 2/λmax(JJᵀ): projected gradient descent
    # on ½λᵀJJᵀλ over Δ, whose minimiser is MGDA's min-norm weights
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(3, 5, generator=g, dtype=F64)
    G = gramian(J)
    gamma = 1.0 / float(torch.linalg.eigvalsh(G).max())
    state = None
    for _ in range(3000):
        out = moco_step(J, state, beta=1.0, beta_sigma=0.0, gamma=gamma, gamma_sigma=0.0)
        state = out.state
    w = mgda_weights(G)
    torch.testing.assert_close(out.weights, w.to(F64), atol=1e-5, rtol=0)
    assert float(out.direction.norm()) == pytest.approx(float((w.to(F64) @ J).norm()), abs=1e-6)


def test_tracking_averages_noisy_gradients():
    # Yₖ with βₖ = 1/k (β = 1, σβ = 1) is the running mean of the gradients seen so far
    g = torch.Generator().manual_seed(1)
    Js = [torch.randn(2, 4, generator=g, dtype=F64) for _ in range(6)]
    state = None
    for J in Js:
        state = moco_step(J, state, beta=1.0, beta_sigma=1.0).state
    torch.testing.assert_close(state.tracked, torch.stack(Js).mean(0))


# ------------------------------------------------------------------------------------------ state
def test_state_is_restored_by_task_name():
    g = torch.Generator().manual_seed(4)
    Js = [torch.randn(3, 5, generator=g) for _ in range(4)]
    s = bound(MoCo(gamma=0.5), "abc")
    for J in Js[:3]:
        s.compute_direction(J, torch.ones(3))
    saved = s.state_dict()
    assert saved["state"]["method"]["tracked"].device.type == "cpu"
    other = bound(MoCo(gamma=0.5), ("c", "a", "b"))
    other.load_state_dict(saved)
    assert other.updates == 3
    torch.testing.assert_close(other.tracked, s.tracked[[2, 0, 1]])
    torch.testing.assert_close(other.lambdas, s.lambdas[[2, 0, 1]])
    out_s, out_o = (
        s.compute_direction(Js[3], torch.ones(3)),
        other.compute_direction(Js[3][[2, 0, 1]], torch.ones(3)),
    )
    torch.testing.assert_close(out_o.shared, out_s.shared, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_o.weights, out_s.weights[[2, 0, 1]])
    with pytest.raises(ValueError, match="normalize.*saved 'none'.*current 'loss_norm'"):
        bound(MoCo(normalize="loss_norm"), "abc").load_state_dict(saved)


def test_reset_state_forgets_the_tracking():
    s = bound(MoCo())
    s.compute_direction(torch.randn(2, 3), torch.ones(2))
    s.reset_state()
    assert s.tracked is None and s.lambdas is None and s.updates == 0


def test_resume_matches_uninterrupted(tmp_path):
    data = loader(make_data(n=40), batch_size=8)
    straight, s_straight = ConflictNet(optimizer="adam", lr=0.01), MoCo()
    trainer(max_epochs=2, callbacks=[s_straight]).fit(straight, data)
    t1 = trainer(max_epochs=1, callbacks=[MoCo()])
    t1.fit(ConflictNet(optimizer="adam", lr=0.01), data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = ConflictNet(optimizer="adam", lr=0.01), MoCo()
    trainer(max_epochs=2, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.weights_tensor(), s_straight.weights_tensor(), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.tracked, s_straight.tracked, atol=1e-6, rtol=0)
    assert s_resumed.updates == s_straight.updates == 10
    state = torch.load(tmp_path / "half.ckpt", weights_only=True)["callbacks"]  # tensors and primitives only
    assert any("MoCo" in key for key in state)


def test_accumulation_equals_the_large_batch():
    ds = make_data(n=48)
    small, big = ConflictNet(accumulate_grad_batches=2), ConflictNet()
    s_small, s_big = MoCo(), MoCo()
    trainer(max_epochs=2, callbacks=[s_small]).fit(small, loader(ds, batch_size=6))
    trainer(max_epochs=2, callbacks=[s_big]).fit(big, loader(ds, batch_size=12))
    assert s_small.updates == s_big.updates == 8
    torch.testing.assert_close(flat_params(small), flat_params(big), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s_small.weights_tensor(), s_big.weights_tensor(), atol=1e-5, rtol=1e-5)


def _mean_loss(net) -> float:
    x, y = make_data(n=64).tensors
    with torch.no_grad():
        return float(sum(net.task_losses((x, y), 0).values()))


@pytest.mark.parametrize("normalize", ["none", "loss_norm"])
def test_bf16_mixed_trains(normalize):
    net = ConflictNet(lr=0.05)
    before = _mean_loss(net)
    strategy = MoCo(normalize=normalize)
    trainer(max_epochs=3, precision="bf16-mixed", callbacks=[strategy]).fit(net, loader(make_data(n=64), 16))
    assert _mean_loss(net) < before
    w = strategy.weights_tensor()
    assert bool(torch.isfinite(w).all()) and float(w.sum()) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    single, rank0, rank1 = ddp_parity_records(tmp_path, lambda: MoCo(gamma=0.5), epochs=3, tag="moco")
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    s0, s1 = rank0["state"]["state"]["method"], rank1["state"]["state"]["method"]
    assert torch.equal(s0["tracked"], s1["tracked"]) and torch.equal(s0["lambdas"], s1["lambdas"])
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=0)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, abs=1e-5), task
    ss = single["state"]["state"]["method"]
    torch.testing.assert_close(s0["tracked"], ss["tracked"], atol=1e-5, rtol=0)
    assert ss["step"] == s0["step"] == 12
    assert any(abs(w - 1 / 3) > 1e-3 for w in single["weights"].values())


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(beta=0.0), r"beta must be a finite number > 0.0 and <= 1.0, got 0.0"),
        (dict(beta=1.5), r"beta.*got 1.5"),
        (dict(beta=True), r"beta.*got True"),
        (dict(beta_sigma=-0.5), r"beta_sigma.*>= 0.*-0.5"),
        (dict(gamma=0.0), r"gamma.*> 0.*0.0"),
        (dict(gamma=math.inf), r"gamma.*inf"),
        (dict(gamma_sigma=math.nan), r"gamma_sigma.*nan"),
        (dict(rho=-1.0), r"rho.*>= 0.*-1.0"),
        (dict(normalize="l2"), r"normalize must be one of \('none', 'loss_norm'\), got 'l2'"),
        (dict(projection="sort"), r"projection must be one of \('simplex', 'softmax'\), got 'sort'"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoCo(**kwargs)


def test_state_of_another_shape_is_a_clear_error():
    state = MoCoState(torch.zeros(2, 4, dtype=F64), torch.full((2,), 0.5, dtype=F64), 1)
    with pytest.raises(ValueError, match=r"state.tracked must have J's shape \(2, 3\), got \(2, 4\)"):
        moco_step(torch.zeros(2, 3, dtype=F64), state)


def test_fp16_overflow_skips_the_step_and_leaves_the_state():
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**30))
    model, strategy = ConflictNet(), MoCo()
    before = flat_params(model)
    trainer(max_steps=1, plugins=[plugin], callbacks=[strategy]).fit(model, loader(make_data(n=16), 16))
    assert plugin.scaler.get_scale() < 2.0**30  # the fp16 gradients overflowed: the scaler skipped the step
    assert torch.equal(flat_params(model), before)
    assert strategy.tracked is None and strategy.updates == 0


@pytest.mark.timeout(240)
def test_local_sync_averages_the_state_over_ranks(tmp_path):
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, lambda: MoCo(gamma=0.5, sync="local"), epochs=2, tag="moco-local"
    )
    s0, s1 = rank0["state"]["state"]["method"], rank1["state"]["state"]["method"]
    # Y and λ are averaged after every step: identical on both ranks, λ still on the simplex
    torch.testing.assert_close(s0["tracked"], s1["tracked"], atol=1e-7, rtol=0)
    torch.testing.assert_close(s0["lambdas"], s1["lambdas"], atol=1e-7, rtol=0)
    assert float(s0["lambdas"].sum()) == pytest.approx(1.0) and bool((s0["lambdas"] >= 0).all())
    torch.testing.assert_close(rank0["params"], rank1["params"], atol=1e-7, rtol=0)
    assert s0["step"] == 8
