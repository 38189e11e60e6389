"""Auxiliary-learning strategies GCS (Du et al., arXiv:1812.02224), OLAUX (Lin et al., NeurIPS 2019) and
HydaLearn (Verboven et al., arXiv:2008.11643): hand-computed weights and steps, invariants, the opposing
auxiliary task, resume, task order, DDP parity, bf16, accumulation, partial labels and bad input.

TorchJD implements none of the three methods, so there is no differential test against it."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    ScalarNet,
    TinyNet,
    ddp_parity_records,
    dummy_loader,
    flat_params,
    loader,
    make_data,
    trainer,
)
from torch import nn

from lightning_mtl import Task
from lightning_mtl.functional.auxiliary import (
    cosines_to_main,
    gcs_weights,
    hydalearn_weights,
    main_products,
    olaux_products,
    olaux_update,
)
from lightning_mtl.strategies.gcs import GCS
from lightning_mtl.strategies.hydalearn import HydaLearn
from lightning_mtl.strategies.olaux import OLAUX

AUX = ("a", Task("b", role="auxiliary"), Task("c", role="auxiliary"))
STRATEGIES = [lambda: GCS(), lambda: GCS(weighted=True), lambda: OLAUX(horizon=2), lambda: HydaLearn()]
IDS = ["gcs", "gcs-weighted", "olaux", "hydalearn"]


def _gramian(*rows: tuple[float, ...]) -> torch.Tensor:
    J = torch.tensor(rows, dtype=torch.float64)
    return J @ J.T


def _bound(strategy, tasks=AUX):
    strategy.bind([t if isinstance(t, Task) else Task(t) for t in tasks])
    return strategy


def aux_net(**kwargs) -> TinyNet:
    return TinyNet(tasks=AUX, **kwargs)


# ------------------------------------------------------------------------------------------ functional, by hand
def test_hand_computed_gcs_and_hydalearn_weights():
    # g_a = (1, 0) main; g_b = (2, 1) aux; g_c = (-1, 2) aux
    G = _gramian((1.0, 0.0), (2.0, 1.0), (-1.0, 2.0))
    main = [True, False, False]
    dots, main_sq = main_products(G, main)
    assert dots.tolist() == [1.0, 2.0, -1.0] and float(main_sq) == 1.0
    cos = cosines_to_main(G, main)
    torch.testing.assert_close(
        cos, torch.tensor([1.0, 2 / math.sqrt(5), -1 / math.sqrt(5)], dtype=torch.float64)
    )
    assert gcs_weights(G, main).tolist() == [1.0, 1.0, 0.0]  # gate: cos_b > 0 open, cos_c < 0 closed
    torch.testing.assert_close(
        gcs_weights(G, main, weighted=True), torch.tensor([1.0, 2 / math.sqrt(5), 0.0], dtype=torch.float64)
    )
    # HydaLearn: w_k = max(0, g_mainᵀg_k / ‖g_main‖²) = (2/1, max(0, -1/1)) = (2, 0)
    assert hydalearn_weights(G, main).tolist() == [1.0, 2.0, 0.0]
    assert hydalearn_weights(G, main, max_weight=1.5).tolist() == [1.0, 1.5, 0.0]


def test_several_main_tasks_use_their_summed_gradient():
    # mains g_a = (1, 0), g_d = (0, 1): g_main = (1, 1). aux g_b = (1, -2): g_mainᵀg_b = -1 < 0, although
    # g_aᵀg_b = 1 > 0: compared with the sum, the gate closes.
    G = _gramian((1.0, 0.0), (0.0, 1.0), (1.0, -2.0))
    main = [True, True, False]
    assert gcs_weights(G, main).tolist() == [1.0, 1.0, 0.0]
    torch.testing.assert_close(
        cosines_to_main(G, main)[2], torch.tensor(-1 / math.sqrt(2 * 5), dtype=torch.float64)
    )
    # HydaLearn with aux g_b = (3, 1): dot 4, ‖g_main‖² = 2 -> w_b = 2
    G2 = _gramian((1.0, 0.0), (0.0, 1.0), (3.0, 1.0))
    assert hydalearn_weights(G2, main).tolist() == [1.0, 1.0, 2.0]


def test_boundary_and_zero_norm_conventions():
    # orthogonal aux (cos = 0): gate closed in both variants
    G = _gramian((1.0, 0.0), (0.0, 3.0))
    assert gcs_weights(G, [True, False]).tolist() == [1.0, 0.0]
    assert gcs_weights(G, [True, False], weighted=True).tolist() == [1.0, 0.0]
    # zero aux gradient, zero main gradient: cosine taken as 0, gate closed, no NaN
    for rows in (((1.0, 0.0), (0.0, 0.0)), ((0.0, 0.0), (1.0, 1.0))):
        G = _gramian(*rows)
        assert cosines_to_main(G, [True, False]).tolist()[1] == 0.0
        assert gcs_weights(G, [True, False]).tolist() == [1.0, 0.0]
    assert hydalearn_weights(_gramian((0.0, 0.0), (1.0, 1.0)), [True, False]).tolist() == [1.0, 0.0]
    # no main task (a step where none is labelled): every auxiliary gate closes
    assert gcs_weights(_gramian((1.0, 0.0), (1.0, 1.0)), [False, False]).tolist() == [0.0, 0.0]


def test_olaux_products_and_update_by_hand():
    G = _gramian((1.0, 0.0), (2.0, 1.0), (-1.0, 2.0))
    main = [True, False, False]
    assert olaux_products(G, main).tolist() == [0.0, 2.0, -1.0]
    w = torch.tensor([1.0, 1.0, 0.2], dtype=torch.float64)
    acc = torch.tensor([0.0, 3.0, -50.0], dtype=torch.float64)
    # w_b = 1 + 0.1·3 = 1.3; w_c = 0.2 - 0.1·50 = -4.8 -> clamped to 0; the main weight stays 1
    torch.testing.assert_close(
        olaux_update(w, acc, main, beta=0.1), torch.tensor([1.0, 1.3, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        olaux_update(w, acc, main, beta=0.1, nonnegative=False),
        torch.tensor([1.0, 1.3, -4.8], dtype=torch.float64),
    )


@pytest.mark.parametrize("seed", range(5))
def test_invariants(seed):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(4, 7, generator=g, dtype=torch.float64)
    G = J @ J.T
    main = [True, False, True, False]
    for weighted in (False, True):
        w = gcs_weights(G, main, weighted=weighted)
        assert w[[0, 2]].tolist() == [1.0, 1.0] and bool((w >= 0).all()) and bool((w <= 1).all())
        # the combined direction is never worse for the main loss (to first order) than the main gradient alone
        g_main = J[0] + J[2]
        assert float(g_main @ (w @ J)) >= float(g_main @ g_main) - 1e-9
        # scale invariance: scaling each auxiliary loss, and the main losses by one factor, keeps the gates
        s = torch.tensor([2.0, 0.1, 2.0, 30.0], dtype=torch.float64)
        if not weighted:
            assert torch.equal(gcs_weights(G * s[:, None] * s[None, :], [True, False, True, False]), w)
    h = hydalearn_weights(G, main)
    assert bool((h >= 0).all())
    g_main = J[0] + J[2]
    assert float(g_main @ (h @ J)) >= float(g_main @ g_main) - 1e-9
    # permutation equivariance
    perm = torch.tensor([3, 1, 0, 2])
    main_p = [main[i] for i in perm]
    torch.testing.assert_close(
        gcs_weights(G[perm][:, perm], main_p, weighted=True), gcs_weights(G, main, weighted=True)[perm]
    )
    torch.testing.assert_close(hydalearn_weights(G[perm][:, perm], main_p), h[perm])


# ------------------------------------------------------------------------------------------ strategies, by hand
def test_hand_computed_olaux_fit():
    # ScalarNet: L_main = θ² (t0), L_aux = 2(θ-3)² (t1), θ0 = 1, lr 0.1; horizon N = 2, β = 0.01, init 1.
    # step 1 (θ=1):   g0 = 2, g1 = -8, dot -16;   w = (1, 1), θ = 1 - 0.1·(2 - 8) = 1.6
    # step 2 (θ=1.6): g0 = 3.2, g1 = -5.6, dot -17.92; acc -33.92 -> after it w1 = 1 - 0.3392 = 0.6608;
    #                 this step still uses w = (1, 1): θ = 1.6 - 0.1·(3.2 - 5.6) = 1.84
    # step 3 (θ=1.84): g0 = 3.68, g1 = -4.64; θ = 1.84 - 0.1·(3.68 - 0.6608·4.64) = 1.7786112
    net = ScalarNet(lr=0.1, tasks=[Task("t0"), Task("t1", role="auxiliary")])
    strategy = OLAUX(beta=0.01, horizon=2)
    trainer(max_steps=3, max_epochs=-1, callbacks=[strategy]).fit(net, dummy_loader(3))
    assert net.theta.item() == pytest.approx(1.7786112, abs=1e-5)
    assert strategy.weights == pytest.approx({"t0": 1.0, "t1": 0.6608}, abs=1e-6)
    state = strategy.method_state()
    assert state["count"] == 1 and state["accumulated"].tolist() == pytest.approx(
        [0.0, 3.68 * -4.64], abs=1e-5
    )


def test_hand_computed_gcs_fit_gates_the_opposing_aux():
    # L_main = θ² (t0), L_aux = 2(θ-3)²: g0 = 2θ > 0, g1 = 4(θ-3) < 0 for θ in (0, 3): cos = -1, gate closed,
    # so θ follows the main task alone: θ_k = θ0·(1 - 0.1·2)^k = 0.8^k
    net = ScalarNet(lr=0.1, tasks=[Task("t0"), Task("t1", role="auxiliary")])
    strategy = GCS()
    trainer(max_steps=3, max_epochs=-1, callbacks=[strategy]).fit(net, dummy_loader(3))
    assert net.theta.item() == pytest.approx(0.8**3, abs=1e-6)
    assert strategy.weights == {"t0": 1.0, "t1": 0.0}
    assert strategy.extra_metrics()["train/gcs/cos/t1"].item() == pytest.approx(-1.0)


@pytest.mark.parametrize("weighted", [False, True])
def test_gcs_step_equals_the_rule_on_independent_gradients(weighted):
    net, ref = aux_net(), aux_net()
    strategy = GCS(weighted=weighted)
    trainer(max_steps=1, max_epochs=-1, callbacks=[strategy]).fit(net, loader(make_data(), 16))
    x, y = make_data()[:16]
    z = ref.encoder(x)
    shared = list(ref.encoder.parameters())
    losses = [
        nn.functional.mse_loss(ref.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate(ref.task_names)
    ]
    J = torch.stack(
        [torch.cat([g.flatten() for g in torch.autograd.grad(L, shared, retain_graph=True)]) for L in losses]
    )
    w = gcs_weights(J.double() @ J.double().T, [True, False, False], weighted=weighted).float()
    assert list(strategy.weights.values()) == pytest.approx(w.tolist(), abs=1e-6)
    old = torch.cat([p.detach().flatten() for p in shared])
    new = torch.cat([p.detach().flatten() for p in net.encoder.parameters()])
    torch.testing.assert_close(new, old - 0.05 * (w @ J), atol=1e-6, rtol=0)
    # every head moved by its own task's plain gradient, including closed-gate auxiliary heads
    for t, loss in zip(ref.task_names, losses):
        grads = torch.autograd.grad(loss, list(ref.heads[t].parameters()), retain_graph=True)
        for p_new, p_old, gr in zip(net.heads[t].parameters(), ref.heads[t].parameters(), grads):
            torch.testing.assert_close(p_new.detach(), p_old.detach() - 0.05 * gr, atol=1e-6, rtol=0)


@pytest.mark.parametrize("make", STRATEGIES, ids=IDS)
def test_representation_mode_trains(make):
    from helpers import RepTinyNet

    strategy = make()
    strategy = type(strategy)(
        **({"weighted": strategy.weighted} if isinstance(strategy, GCS) else {}), mode="representation"
    )
    ds = make_data()
    net = RepTinyNet(tasks=AUX)
    before = _total_main(net, ds)
    trainer(max_epochs=3, callbacks=[strategy]).fit(net, loader(ds))
    assert _total_main(net, ds) < before and strategy.weights["a"] == 1.0


# ------------------------------------------------------------------------------------------ the opposing aux task
class OpposedNet(TinyNet):
    """Main task ``m``: regression ``h(z) ≈ y`` (shared encoder ``z``, main head ``h``). Auxiliary task ``o``: a
    "confusion" objective ``c / (1 + L_m)`` computed through the main head's weights detached; its gradient on
    the encoder is ``−c/(1 + L_m)² · ∇L_m``, exactly opposed to the main task's (cos = −1), and stronger than it
    once ``L_m < √c − 1``: under equal weighting the encoder is pushed back whenever the main task gets good.
    With ``main_only`` the model has the main task alone (same parameters, same initialisation)."""

    def __init__(self, main_only: bool = False, c: float = 9.0, **kwargs):
        tasks = ("m",) if main_only else ("m", Task("o", role="auxiliary"))
        super().__init__(tasks=tasks, in_dim=6, hidden=8, lr=0.05, **kwargs)
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.heads = nn.ModuleDict()
        self.c = c

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        out = {"m": nn.functional.mse_loss(self.head(z).squeeze(1), y[:, 0])}
        if "o" in self.task_names:
            detached = nn.functional.linear(z, self.head.weight.detach(), self.head.bias.detach()).squeeze(1)
            out["o"] = self.c / (1 + nn.functional.mse_loss(detached, y[:, 0]))
        return out


def _main_loss(net: OpposedNet, ds) -> float:
    x, y = ds.tensors
    with torch.no_grad():
        return float(nn.functional.mse_loss(net.head(net.encoder(x)).squeeze(1), y[:, 0]))


def test_opposing_auxiliary_task_does_not_slow_the_main_task_under_gcs():
    from lightning_mtl.strategies.equal import EqualWeighting

    ds = make_data(n=128)
    runs = {}
    for name, make_net, strategy in (
        ("alone", lambda: OpposedNet(main_only=True), EqualWeighting()),
        ("equal", OpposedNet, EqualWeighting()),
        ("gcs", OpposedNet, GCS()),
        ("gcs_weighted", OpposedNet, GCS(weighted=True)),
    ):
        net = make_net()
        trainer(max_epochs=5, callbacks=[strategy]).fit(net, loader(ds, 16))
        runs[name] = _main_loss(net, ds)
    start = _main_loss(OpposedNet(), ds)
    assert runs["alone"] < 0.5 * start  # the main task learns on its own
    assert (
        runs["equal"] > 2 * runs["alone"]
    )  # the opposing auxiliary task slows it down under equal weighting
    for name in ("gcs", "gcs_weighted"):
        # under GCS the main task learns as fast as alone (within 5 %) and much faster than under equal weighting
        assert runs[name] == pytest.approx(runs["alone"], rel=0.05), runs
        assert runs[name] < 0.5 * runs["equal"], runs


# ------------------------------------------------------------------------------------------ fits, bad input
@pytest.mark.parametrize("make", STRATEGIES, ids=IDS)
def test_fit_trains_and_logs_weights(make):
    ds = make_data()
    net, strategy = aux_net(), make()
    before = _total_main(net, ds)
    trainer(max_epochs=3, callbacks=[strategy]).fit(net, loader(ds))
    assert _total_main(net, ds) < before
    weights = strategy.weights
    assert set(weights) == {"a", "b", "c"} and weights["a"] == 1.0
    assert all(w >= 0 and math.isfinite(w) for w in weights.values())


def _total_main(net, ds) -> float:
    x, y = ds.tensors
    with torch.no_grad():
        return float(nn.functional.mse_loss(net.heads["a"](net.encoder(x)).squeeze(1), y[:, 0]))


@pytest.mark.parametrize("make", STRATEGIES, ids=IDS)
@pytest.mark.parametrize("tasks", [("a", "b"), (Task("a", role="main"), "b")])
def test_needs_a_main_and_an_auxiliary_task(make, tasks):
    with pytest.raises(ValueError, match=r"at least one main and one auxiliary task.*role='auxiliary'"):
        trainer(max_epochs=1, callbacks=[make()]).fit(TinyNet(tasks=tasks), loader(make_data()))


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match="GCS weighted must be True or False, got 1"):
        GCS(weighted=1)
    with pytest.raises(ValueError, match="OLAUX beta must be a finite number > 0, got 0"):
        OLAUX(beta=0)
    with pytest.raises(ValueError, match="OLAUX horizon must be an int >= 1.*got 0"):
        OLAUX(horizon=0)
    with pytest.raises(ValueError, match="OLAUX init must be a finite number >= 0, got -1"):
        OLAUX(init=-1)
    with pytest.raises(ValueError, match="HydaLearn max_weight must be a finite number > 0 or None, got 0"):
        HydaLearn(max_weight=0)
    with pytest.raises(ValueError, match="main must be a boolean mask with one entry per task"):
        gcs_weights(torch.eye(3), [True, False])


@pytest.mark.parametrize("make", STRATEGIES, ids=IDS)
def test_bf16_and_accumulation_train(make):
    ds = make_data()
    for kwargs, trainer_kwargs in (({}, {"precision": "bf16-mixed"}), ({"accumulate_grad_batches": 2}, {})):
        net = aux_net(**kwargs)
        before = _total_main(net, ds)
        trainer(max_epochs=3, callbacks=[make()], **trainer_kwargs).fit(net, loader(ds, 8))
        assert _total_main(net, ds) < before, trainer_kwargs or kwargs


def test_accumulation_equals_the_big_batch():
    # 2 micro-batches of 8 == one batch of 16 (the Gramian of the window's gradient)
    ds = make_data()
    for make in (lambda: GCS(weighted=True), lambda: OLAUX(horizon=2), lambda: HydaLearn()):
        big, small = aux_net(), aux_net(accumulate_grad_batches=2)
        trainer(max_epochs=2, callbacks=[make()]).fit(big, loader(ds, 16))
        trainer(max_epochs=2, callbacks=[make()]).fit(small, loader(ds, 8))
        torch.testing.assert_close(flat_params(small), flat_params(big), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ OLAUX state
def test_olaux_state_restored_by_task_name():
    G = _gramian((1.0, 0.5, 0.0), (2.0, 1.0, -1.0), (-1.0, 2.0, 0.3))
    s = _bound(OLAUX(beta=0.1, horizon=3))
    for _ in range(4):
        s.compute_weights(G, torch.ones(3))  # one update after 3 steps, then 1 accumulated
    saved = s.state_dict()
    other = _bound(
        OLAUX(beta=0.1, horizon=3), (Task("c", role="auxiliary"), "a", Task("b", role="auxiliary"))
    )
    other.load_state_dict(saved)
    perm = [2, 0, 1]
    torch.testing.assert_close(other._aux, s._aux[perm])
    torch.testing.assert_close(other._acc, s._acc[perm])
    assert other._count == s._count == 1
    w = s.compute_weights(G, torch.ones(3))
    torch.testing.assert_close(other.compute_weights(G[perm][:, perm], torch.ones(3)), w[perm])


def test_olaux_resume_with_other_roles_is_an_error():
    s = _bound(OLAUX())
    s.compute_weights(_gramian((1.0, 0.0), (1.0, 1.0), (0.0, 1.0)), torch.ones(3))
    saved = s.state_dict()
    other = _bound(OLAUX(), (Task("a", role="auxiliary"), "b", Task("c", role="auxiliary")))
    with pytest.raises(ValueError, match="main_tasks"):
        other.load_state_dict(saved)


def test_olaux_resume_matches_uninterrupted(tmp_path):
    # 4 steps per epoch, N = 3: the checkpoint after 2 epochs (step 8) holds 2 accumulated steps
    data = loader(make_data(n=48), batch_size=12)

    def strategy():
        return OLAUX(beta=0.05, horizon=3)

    straight, s_straight = aux_net(optimizer="adam", lr=0.01), strategy()
    trainer(max_epochs=4, callbacks=[s_straight]).fit(straight, data)
    t1 = trainer(max_epochs=2, callbacks=[strategy()])
    t1.fit(aux_net(optimizer="adam", lr=0.01), data)
    assert t1.callbacks[0]._count == 2
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = aux_net(optimizer="adam", lr=0.01), strategy()
    trainer(max_epochs=4, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    assert s_resumed.weights == pytest.approx(s_straight.weights, abs=1e-6)
    assert any(abs(w - 1) > 1e-3 for w in s_straight.weights.values())


# ------------------------------------------------------------------------------------------ partial labels
class PartialAux(TinyNet):
    """Task ``b`` is auxiliary and partial: absent on odd batches."""

    def __init__(self, **kwargs):
        super().__init__(
            tasks=("a", Task("b", role="auxiliary", partial=True), Task("c", role="auxiliary")), **kwargs
        )

    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        if batch_idx % 2 == 1:
            del losses["b"]
        return losses


def test_olaux_absent_auxiliary_task_keeps_its_state():
    net, strategy = PartialAux(), OLAUX(horizon=100)
    seen = []

    class Watch(__import__("lightning.pytorch", fromlist=["Callback"]).Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch_idx, strategy._acc.clone()))

    trainer(max_steps=4, max_epochs=-1, callbacks=[strategy, Watch()]).fit(net, loader(make_data(), 16))
    accs = dict(seen)
    assert accs[1][1] == accs[0][1]  # b absent on batch 1: its accumulator untouched
    assert accs[1][2] != accs[0][2]  # c present: accumulated
    assert accs[2][1] != accs[1][1]
    assert strategy.weights["b"] is not None


@pytest.mark.parametrize("make", [lambda: GCS(), lambda: HydaLearn()], ids=["gcs", "hydalearn"])
def test_absent_auxiliary_task_gets_weight_zero(make):
    net, strategy = PartialAux(), make()
    trainer(max_steps=2, max_epochs=-1, callbacks=[strategy]).fit(net, loader(make_data(), 16))
    assert strategy.weights["b"] == 0.0 and strategy.weights["a"] == 1.0


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "make",
    [lambda: GCS(weighted=True), lambda: OLAUX(beta=0.05, horizon=2), lambda: HydaLearn()],
    ids=["gcs", "olaux", "hydalearn"],
)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, make):
    single, rank0, rank1 = ddp_parity_records(tmp_path, make, epochs=3, model=aux_net, tag="aux")
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, abs=1e-5), task
