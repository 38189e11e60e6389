"""DB-MTL (Lin et al., arXiv:2308.12029): hand-computed steps, invariants (max-norm rescaling, loss-scale
invariance), the update and the heads in a fit, positive losses, state by task name, resume, DDP, AMP,
accumulation.

TorchJD 0.18 has no DB-MTL (checked: nothing in ``torchjd.aggregation`` takes log-losses or keeps a moving
average of the Jacobian): no differential test."""

from __future__ import annotations

import copy
import math

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

from lightning_mtl.functional.dbmtl import DBMTLState, dbmtl_step, log_loss_jacobian
from lightning_mtl.strategies.dbmtl import DBMTL

F64 = torch.float64


def _J(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ------------------------------------------------------------------------------------------ hand-computed
def test_hand_computed_two_steps_with_a_2x3_jacobian():
    # β = 0.5, σ = 0; Ĝ₀ = 0
    # step 1: J = [[3, 4, 0], [0, 0, 1]], L = (2, 0.5): G = diag(1/L)J = [[1.5, 2, 0], [0, 0, 2]]
    #   Ĝ = G + 0.5(0 − G) = [[0.75, 1, 0], [0, 0, 1]]; ‖ĝ‖ = (1.25, 1); α = 1.25/(‖ĝ‖ + 1e-8) ≈ (1, 1.25)
    #   d = 1·(0.75, 1, 0) + 1.25·(0, 0, 1) = (0.75, 1, 1.25)
    first = dbmtl_step(_J([[3, 4, 0], [0, 0, 1]]), _J([2.0, 0.5]), beta=0.5)
    torch.testing.assert_close(first.state.ema, _J([[0.75, 1, 0], [0, 0, 1]]))
    torch.testing.assert_close(first.scales, _J([1.0, 1.25]), atol=1e-6, rtol=0)
    torch.testing.assert_close(first.direction, _J([0.75, 1.0, 1.25]), atol=1e-6, rtol=0)
    assert first.state.step == 1
    # step 2: J = [[0, 4, 0], [0, 0, 2]], L = (4, 1): G = [[0, 1, 0], [0, 0, 2]]
    #   Ĝ = G + 0.5(Ĝ − G) = ½(Ĝ + G) = [[0.375, 1, 0], [0, 0, 1.5]]; ‖ĝ‖ = (√1.140625, 1.5)
    #   α = (1.5/√1.140625, 1); d = α₀·(0.375, 1, 0) + (0, 0, 1.5)
    second = dbmtl_step(_J([[0, 4, 0], [0, 0, 2]]), _J([4.0, 1.0]), first.state, beta=0.5)
    torch.testing.assert_close(second.state.ema, _J([[0.375, 1, 0], [0, 0, 1.5]]))
    a0 = 1.5 / math.sqrt(1.140625)
    torch.testing.assert_close(second.scales, _J([a0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(second.direction, _J([0.375 * a0, a0, 1.5]), atol=1e-6, rtol=0)


def test_hand_computed_decaying_beta_through_the_strategy():
    # β = 0.5, σ = 1: β₁ = 0.5, β₂ = 0.25. J = [[2, 0], [0, 1]] both steps, L = (1, 1) then (2, 1)
    # step 1: G = J, Ĝ = 0.5·J = [[1, 0], [0, 0.5]]; α = (1, 2); d = (1, 1); w = α/L = (1, 2); heads = 1/L
    # step 2: G = [[1, 0], [0, 1]]; Ĝ = G + 0.25(Ĝ − G) = [[1, 0], [0, 0.875]]; α = (1, 1/0.875)
    #   d = (1, 1); w = (1/2, 1/0.875); heads = (1/2, 1)
    s = bound(DBMTL(beta=0.5, beta_sigma=1.0))
    J = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    out = s.compute_direction(J, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(out.shared, torch.tensor([1.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.weights, torch.tensor([1.0, 2.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.heads, torch.tensor([1.0, 1.0]))
    out = s.compute_direction(J, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(s.ema, torch.tensor([[1.0, 0.0], [0.0, 0.875]]))
    torch.testing.assert_close(out.shared, torch.tensor([1.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.weights, torch.tensor([0.5, 1 / 0.875]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.heads, torch.tensor([0.5, 1.0]))
    assert s.updates == 2
    metrics = s.extra_metrics()
    assert metrics["train/dbmtl/scale/b"].item() == pytest.approx(1 / 0.875, abs=1e-6)


def test_hand_computed_update_in_a_fit():
    # ScalarNet with three tasks: L = (θ², 2(θ − 3)², ½(θ − 4)²), g = (2θ, 4(θ − 3), θ − 4), β = 0.5, lr 0.1.
    # With one parameter every rescaled ĝᵢ has the largest |ĝ|: d = max|ĝ|·Σ sign(ĝᵢ).
    # step 1 (θ = 1): L = (1, 8, 4.5), g/L = (2, −1, −2/3); Ĝ = ½·g/L = (1, −½, −⅓); d = 1·(1 − 1 − 1) = −1
    #   θ₁ = 1 + 0.1 = 1.1
    net = ScalarNet(k=(1.0, 2.0, 0.5), targets=(0.0, 3.0, 4.0), lr=0.1)
    strategy = DBMTL(beta=0.5)
    trainer(max_steps=2, max_epochs=-1, callbacks=[strategy]).fit(net, dummy_loader(2))
    # step 2 (θ = 1.1): L = (1.21, 7.22, 4.205), g = (2.2, −7.6, −2.9); Ĝ = ½(Ĝ + g/L)
    L = [1.21, 2 * 1.9**2, 0.5 * 2.9**2]
    ema = [0.5 * (1 + 2.2 / L[0]), 0.5 * (-0.5 - 7.6 / L[1]), 0.5 * (-1 / 3 - 2.9 / L[2])]
    top = max(abs(e) for e in ema)  # task 0's: d = top·(1 − 1 − 1)
    assert net.theta.item() == pytest.approx(1.1 + 0.1 * top, abs=1e-6)
    alphas = [top / abs(e) for e in ema]
    assert list(strategy.weights.values()) == pytest.approx(
        [a / loss for a, loss in zip(alphas, L)], rel=1e-5
    )


def test_update_equals_the_functional_rule_and_heads_get_the_log_loss_gradient():
    data = make_data(n=16)
    net = ConflictNet(lr=0.1)
    reference = copy.deepcopy(net)
    trainer(max_steps=1, callbacks=[DBMTL()]).fit(net, loader(data, batch_size=16))
    x, y = data.tensors
    losses = reference.task_losses((x, y), 0)
    shared = list(reference.encoder.parameters())
    rows = [torch.autograd.grad(L, shared, retain_graph=True) for L in losses.values()]
    J = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])
    L = torch.stack(list(losses.values())).detach()
    expected = dbmtl_step(J.double(), L.double()).direction.float()
    old, new = reference.encoder.parameters(), net.encoder.parameters()
    moved = torch.cat([(a - b).flatten() for a, b in zip(old, new)])
    torch.testing.assert_close(moved, 0.1 * expected, atol=1e-6, rtol=1e-5)
    for name, loss in losses.items():  # the heads: −lr·∇log Lᵢ = −lr·∇Lᵢ/Lᵢ
        head, after = reference.heads[name], net.heads[name]
        grads = torch.autograd.grad(torch.log(loss), list(head.parameters()), retain_graph=True)
        for p, q, g in zip(head.parameters(), after.parameters(), grads):
            torch.testing.assert_close(p - q, 0.1 * g, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("seed", range(5))
def test_every_scaled_moving_gradient_has_the_largest_norm(seed):
    g = torch.Generator().manual_seed(seed)
    state = None
    for _ in range(4):
        J = torch.randn(4, 6, generator=g, dtype=F64) * torch.tensor(
            [[0.1], [1.0], [10.0], [100.0]], dtype=F64
        )
        L = torch.rand(4, generator=g, dtype=F64) * 5 + 0.1
        out = dbmtl_step(J, L, state)
        state = out.state
        scaled = out.scales.to(F64).unsqueeze(1) * out.state.ema
        norms = scaled.norm(dim=1)
        # every αᵢĝᵢ has the largest norm, up to LibMTL's absolute ε: αᵢ = max‖ĝ‖/(‖ĝᵢ‖ + 1e-8)
        raw = out.state.ema.norm(dim=1)
        torch.testing.assert_close(norms, raw.max() * raw / (raw + 1e-8))
        torch.testing.assert_close(norms, norms.max().expand(4), atol=0, rtol=1e-5)
        assert float(out.scales.min()) == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(out.direction, scaled.sum(0))


def test_the_update_does_not_depend_on_the_losses_scales():
    # Lᵢ → cᵢLᵢ multiplies ∇Lᵢ by cᵢ: ∇log Lᵢ, Ĝ and the update do not change
    g = torch.Generator().manual_seed(3)
    c = _J([1e-3, 1.0, 250.0])
    s1 = s2 = None
    for _ in range(3):
        J = torch.randn(3, 5, generator=g, dtype=F64)
        L = torch.rand(3, generator=g, dtype=F64) + 0.5
        a, b = dbmtl_step(J, L, s1), dbmtl_step(c.unsqueeze(1) * J, c * L, s2)
        s1, s2 = a.state, b.state
        torch.testing.assert_close(a.direction, b.direction)
    torch.testing.assert_close(log_loss_jacobian(J, L), log_loss_jacobian(c.unsqueeze(1) * J, c * L))


def test_beta_zero_is_the_max_norm_combination_of_the_step():
    J, L = _J([[3, 4], [0, 1]]), _J([1.0, 2.0])
    out = dbmtl_step(J, L, dbmtl_step(_J([[9, 9], [9, 9]]), L).state, beta=0.0)
    # G = [[3, 4], [0, 0.5]]: norms (5, 0.5), α = (1, 10): d = (3, 4) + 10·(0, 0.5) = (3, 9)
    torch.testing.assert_close(out.direction, _J([3.0, 9.0]), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ positive losses
@pytest.mark.parametrize("bad", [0.0, -0.5, math.inf, math.nan])
def test_non_positive_loss_is_a_clear_error_naming_the_task(bad):
    with pytest.raises(ValueError, match=r"every task loss must be a finite number > 0; got \{'b': "):
        dbmtl_step(_J([[1, 0], [0, 1]]), _J([1.0, bad]), names=["a", "b"])


class NegativeNet(ScalarNet):
    """Task t1's loss is −2(θ − 3)² ≤ 0."""

    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        return {"t0": losses["t0"], "t1": -losses["t1"]}


def test_non_positive_loss_in_a_fit_names_the_task_and_its_value():
    with pytest.raises(ValueError, match=r"DBMTL.*> 0; got \{'t1': -8.0\}.*strictly positive"):
        trainer(max_steps=1, callbacks=[DBMTL()]).fit(NegativeNet(), dummy_loader(1))


# ------------------------------------------------------------------------------------------ state
def test_state_is_restored_by_task_name():
    g = torch.Generator().manual_seed(4)
    Js = [torch.randn(3, 5, generator=g) for _ in range(4)]
    Ls = [torch.rand(3, generator=g) + 0.5 for _ in range(4)]
    s = bound(DBMTL(), "abc")
    for J, L in zip(Js[:3], Ls[:3]):
        s.compute_direction(J, L)
    saved = s.state_dict()
    assert saved["state"]["method"]["ema"].device.type == "cpu"
    other = bound(DBMTL(), ("c", "a", "b"))
    other.load_state_dict(saved)
    assert other.updates == 3
    torch.testing.assert_close(other.ema, s.ema[[2, 0, 1]])
    perm = [2, 0, 1]
    out_s, out_o = s.compute_direction(Js[3], Ls[3]), other.compute_direction(Js[3][perm], Ls[3][perm])
    torch.testing.assert_close(out_o.shared, out_s.shared, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_o.weights, out_s.weights[perm])


def test_reset_state_forgets_the_moving_average():
    s = bound(DBMTL())
    s.compute_direction(torch.randn(2, 3), torch.ones(2))
    s.reset_state()
    assert s.ema is None and s.updates == 0


def test_resume_matches_uninterrupted(tmp_path):
    data = loader(make_data(n=40), batch_size=8)
    straight, s_straight = ConflictNet(optimizer="adam", lr=0.01), DBMTL()
    trainer(max_epochs=2, callbacks=[s_straight]).fit(straight, data)
    t1 = trainer(max_epochs=1, callbacks=[DBMTL()])
    t1.fit(ConflictNet(optimizer="adam", lr=0.01), data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = ConflictNet(optimizer="adam", lr=0.01), DBMTL()
    trainer(max_epochs=2, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.weights_tensor(), s_straight.weights_tensor(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s_resumed.ema, s_straight.ema, atol=1e-6, rtol=0)
    assert s_resumed.updates == s_straight.updates == 10
    state = torch.load(tmp_path / "half.ckpt", weights_only=True)["callbacks"]  # tensors and primitives only
    assert any("DBMTL" in key for key in state)


def test_accumulation_equals_the_large_batch():
    ds = make_data(n=48)
    small, big = ConflictNet(accumulate_grad_batches=2), ConflictNet()
    s_small, s_big = DBMTL(), DBMTL()
    trainer(max_epochs=2, callbacks=[s_small]).fit(small, loader(ds, batch_size=6))
    trainer(max_epochs=2, callbacks=[s_big]).fit(big, loader(ds, batch_size=12))
    assert s_small.updates == s_big.updates == 8
    torch.testing.assert_close(flat_params(small), flat_params(big), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s_small.weights_tensor(), s_big.weights_tensor(), atol=1e-5, rtol=1e-5)


def _mean_loss(net) -> float:
    x, y = make_data(n=64).tensors
    with torch.no_grad():
        return float(sum(net.task_losses((x, y), 0).values()))


def test_bf16_mixed_trains():
    net = ConflictNet(lr=0.02)
    before = _mean_loss(net)
    strategy = DBMTL()
    trainer(max_epochs=3, precision="bf16-mixed", callbacks=[strategy]).fit(net, loader(make_data(n=64), 16))
    assert _mean_loss(net) < before
    assert bool(torch.isfinite(strategy.weights_tensor()).all()) and strategy.updates == 12


def test_fp16_overflow_skips_the_step_and_leaves_the_state():
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**30))
    model, strategy = ConflictNet(), DBMTL()
    before = flat_params(model)
    trainer(max_steps=1, plugins=[plugin], callbacks=[strategy]).fit(model, loader(make_data(n=16), 16))
    assert plugin.scaler.get_scale() < 2.0**30  # the fp16 gradients overflowed: the scaler skipped the step
    assert torch.equal(flat_params(model), before)
    assert strategy.ema is None and strategy.updates == 0


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.timeout(240)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    single, rank0, rank1 = ddp_parity_records(tmp_path, lambda: DBMTL(), epochs=3, tag="dbmtl")
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    e0, e1 = rank0["state"]["state"]["method"]["ema"], rank1["state"]["state"]["method"]["ema"]
    assert torch.equal(e0, e1)
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=0)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, rel=1e-4), task
    torch.testing.assert_close(e0, single["state"]["state"]["method"]["ema"], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(beta=1.0), r"beta must be a finite number in \[0, 1\), got 1.0"),
        (dict(beta=-0.1), r"beta.*-0.1"),
        (dict(beta=True), r"beta.*True"),
        (dict(beta=math.nan), r"beta.*nan"),
        (dict(beta_sigma=-1.0), r"beta_sigma must be a finite number >= 0, got -1.0"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DBMTL(**kwargs)


def test_state_of_another_shape_is_a_clear_error():
    state = DBMTLState(torch.zeros(2, 4, dtype=F64), 1)
    with pytest.raises(ValueError, match=r"state.ema must have J's shape \(2, 3\), got \(2, 4\)"):
        dbmtl_step(torch.zeros(2, 3, dtype=F64), torch.ones(2, dtype=F64), state)


@pytest.mark.ddp_extra  # the same mechanism as MoCo's local-sync / MoDo's and SDMGrad's DDP test
@pytest.mark.timeout(240)
def test_local_sync_averages_the_state_over_ranks(tmp_path):
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, lambda: DBMTL(sync="local"), epochs=2, tag="dbmtl-local"
    )
    e0, e1 = rank0["state"]["state"]["method"]["ema"], rank1["state"]["state"]["method"]["ema"]
    torch.testing.assert_close(e0, e1, atol=1e-7, rtol=0)  # Ĝ is averaged after every step
    torch.testing.assert_close(rank0["params"], rank1["params"], atol=1e-7, rtol=0)
    assert rank0["state"]["state"]["method"]["step"] == 8
