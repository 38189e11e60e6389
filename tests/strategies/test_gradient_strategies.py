"""Each gradient strategy's update equals the functional rule applied to independently computed gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import RepTinyNet, TinyNet, flat_params, loader, make_data, trainer
from torch import nn

from lightning_mtl import functional
from lightning_mtl.functional.aligned_mtl import aligned_mtl_weights
from lightning_mtl.functional.cagrad import cagrad_weights
from lightning_mtl.functional.dualproj import dualproj_weights
from lightning_mtl.functional.fairgrad import fairgrad_weights
from lightning_mtl.functional.graddrop import graddrop
from lightning_mtl.functional.gradvac import gradvac_weights
from lightning_mtl.functional.imtl_g import imtl_g_weights
from lightning_mtl.functional.mgda import mgda_weights
from lightning_mtl.functional.nash_mtl import nash_mtl_weights
from lightning_mtl.functional.pcgrad import pcgrad_weights
from lightning_mtl.functional.upgrad import upgrad_weights
from lightning_mtl.strategies.aligned_mtl import AlignedMTL
from lightning_mtl.strategies.cagrad import CAGrad
from lightning_mtl.strategies.fairgrad import FairGrad
from lightning_mtl.strategies.graddrop import GradDrop
from lightning_mtl.strategies.gradvac import GradVac
from lightning_mtl.strategies.imtl_g import IMTLG
from lightning_mtl.strategies.mgda import MGDA
from lightning_mtl.strategies.nash_mtl import NashMTL
from lightning_mtl.strategies.pcgrad import PCGrad
from lightning_mtl.strategies.upgrad import DualProj, UPGrad

LR = 0.05
N = 16
del functional  # imported to check the package exposes the submodules


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# name -> (strategy, weights from (G, losses), representation mode?, shared-gradient clip)
CASES = {
    "pcgrad": (lambda: PCGrad(seed=5), lambda G, L: pcgrad_weights(G, generator=_seeded(5)), False, None),
    "mgda": (lambda: MGDA(), lambda G, L: mgda_weights(G), False, None),
    "mgda-loss+": (
        lambda: MGDA("loss+"),
        lambda G, L: mgda_weights(G, normalization="loss+", losses=L),
        False,
        None,
    ),
    "mgda-ub": (lambda: MGDA(mode="representation"), lambda G, L: mgda_weights(G), True, None),
    "cagrad": (
        lambda: CAGrad(c=0.5, rescale=2),
        lambda G, L: cagrad_weights(G, c=0.5, rescale=2),
        False,
        None,
    ),
    "imtl-g": (lambda: IMTLG(mode="representation"), lambda G, L: imtl_g_weights(G), True, None),
    "gradvac": (
        lambda: GradVac(beta=0.5, seed=2),
        lambda G, L: gradvac_weights(G, None, beta=0.5, generator=_seeded(2)).weights,
        False,
        None,
    ),
    "aligned": (
        lambda: AlignedMTL("median", {"a": 1.0, "b": 2.0, "c": 1.0}),
        lambda G, L: aligned_mtl_weights(G, scale_mode="median", preference=[1.0, 2.0, 1.0]),
        False,
        None,
    ),
    "nash": (lambda: NashMTL(max_norm=0.5), lambda G, L: nash_mtl_weights(G).weights, False, 0.5),
    "upgrad": (
        lambda: UPGrad([0.2, 0.3, 0.5]),
        lambda G, L: upgrad_weights(G, preference=[0.2, 0.3, 0.5]),
        False,
        None,
    ),
    "dualproj": (lambda: DualProj(), lambda G, L: dualproj_weights(G), False, None),
    "fairgrad": (
        lambda: FairGrad(alpha=2.0, max_norm=None),
        lambda G, L: fairgrad_weights(G, alpha=2.0),
        False,
        None,
    ),
}


class ConflictNet(RepTinyNet):
    """TinyNet whose task c is trained towards -2 x task a's target: conflicting gradients."""

    def task_losses(self, batch, batch_idx):
        x, y = batch
        y = torch.stack([y[:, 0], y[:, 1], -2 * y[:, 0]], 1)
        return super().task_losses((x, y), batch_idx)


def _per_task(model: TinyNet, batch, representation: bool):
    """Per-task gradients of every parameter, by one plain autograd call per task."""
    x, y = batch
    y = torch.stack([y[:, 0], y[:, 1], -2 * y[:, 0]], 1)
    z = model.encoder(x)
    losses = torch.stack(
        [nn.functional.mse_loss(model.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate("abc")]
    )
    params = list(model.parameters())
    full, shared, rep = [], [], []
    n_shared = sum(p.numel() for p in model.encoder.parameters())
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        row = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])
        full.append(row)
        shared.append(row[:n_shared])
        rep.append(torch.autograd.grad(loss, z, retain_graph=True)[0].flatten())
    J = torch.stack(rep if representation else shared)
    return torch.stack(full), J @ J.T, losses.detach(), n_shared


def _one_step(strategy, model) -> None:
    trainer(max_steps=1, callbacks=[strategy]).fit(model, loader(make_data(n=N), batch_size=N))


HEADS = {"mgda": "weighted", "mgda-loss+": "weighted", "mgda-ub": "weighted", "nash": "weighted"}


@pytest.mark.parametrize("name", list(CASES))
def test_heads_convention_of_the_reference_code(name):
    """MGDA and Nash-MTL back-propagate the weighted loss (heads get wᵢ∇Lᵢ, as their authors' code); the
    surgery methods' reference code gives the task-specific parameters their plain gradient."""
    assert CASES[name][0]().heads == HEADS.get(name, "plain")


@pytest.mark.parametrize("name", list(CASES))
def test_update_equals_functional_rule(name):
    make_strategy, rule, representation, clip = CASES[name]
    model = ConflictNet(lr=LR)
    before = copy.deepcopy(model)
    full, G, losses, n_shared = _per_task(before, make_data(n=N)[:], representation)
    w = rule(G.double(), losses.double()).float()
    strategy = make_strategy()
    grad = w @ full
    if strategy.heads == "plain":
        # surgery methods (their reference code): the combination applies to the shared part only, the heads
        # get the plain gradient of the summed loss
        grad[n_shared:] = full.sum(0)[n_shared:]
        assert not torch.allclose(w, torch.ones_like(w)), "w = 1: the test would not see weighted heads"
    if clip is not None:
        norm = grad[:n_shared].norm()
        grad[:n_shared] *= min(1.0, clip / float(norm))
    _one_step(strategy, model)
    torch.testing.assert_close(strategy.weights_tensor(), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_params(model), flat_params(before) - LR * grad, atol=1e-6, rtol=1e-5)
    assert "train/grad/cos_min" in strategy.extra_metrics()


def test_graddrop_update_equals_functional_rule():
    model = ConflictNet(lr=LR)
    before = copy.deepcopy(model)
    x, y = make_data(n=N)[:]
    y = torch.stack([y[:, 0], y[:, 1], -2 * y[:, 0]], 1)
    z = before.encoder(x)
    losses = [nn.functional.mse_loss(before.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate("abc")]
    grads = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses])
    combined = graddrop(grads, z.detach(), leak=torch.tensor([1.0, 0.0, 0.0]), generator=_seeded(4))
    assert not torch.allclose(combined, grads.sum(0)), "no gradient was dropped: the test would not see a bug"
    enc = torch.autograd.grad(z, list(before.encoder.parameters()), grad_outputs=combined, retain_graph=True)
    heads = torch.autograd.grad(sum(losses), list(before.heads.parameters()))
    grad = torch.cat([g.flatten() for g in (*enc, *heads)])
    strategy = GradDrop(leak={"a": 1.0}, seed=4)
    _one_step(strategy, model)
    assert strategy.weights is None
    torch.testing.assert_close(flat_params(model), flat_params(before) - LR * grad, atol=1e-6, rtol=1e-5)


class CountingMGDA(MGDA):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0
        self.history = []

    def compute_weights(self, stat, losses):
        self.calls += 1
        return super().compute_weights(stat, losses)

    def on_optimizer_step(self, module, skipped):
        super().on_optimizer_step(module, skipped)
        self.history.append(self.weights_tensor().clone())


def test_update_every_reuses_weights_without_any_jacobian(monkeypatch):
    strategy = CountingMGDA(update_every=3)
    jacobians = []
    original = strategy._gradients._engine.__call__

    def spy(*args, **kwargs):
        jacobians.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(strategy._gradients, "_engine", spy)
    trainer(max_steps=7, callbacks=[strategy]).fit(ConflictNet(), loader(make_data(n=56), batch_size=8))
    assert strategy.calls == len(jacobians) == 3  # steps 0, 3, 6
    h = strategy.history
    assert torch.equal(h[0], h[1]) and torch.equal(h[1], h[2])
    assert torch.equal(h[3], h[4]) and torch.equal(h[4], h[5])
    assert not torch.equal(h[2], h[3]) and not torch.equal(h[5], h[6])


@pytest.mark.parametrize("representation", [False, True])
def test_accumulation_equals_the_large_batch(representation):
    """k micro-batches of B accumulate the Jacobian (Gramian) and aggregate once: equal to one batch of k·B."""
    big, small = ConflictNet(), ConflictNet(accumulate_grad_batches=4)
    mode = "representation" if representation else "parameters"
    s_big, s_small = MGDA(mode=mode), MGDA(mode=mode)
    trainer(max_epochs=2, callbacks=[s_big]).fit(big, loader(make_data(n=64), batch_size=32))
    trainer(max_epochs=2, callbacks=[s_small]).fit(small, loader(make_data(n=64), batch_size=8))
    torch.testing.assert_close(s_small.weights_tensor(), s_big.weights_tensor(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_params(small), flat_params(big), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("representation", [False, True])
def test_plain_heads_with_accumulation_equal_the_large_batch(representation):
    """heads="plain": the shared correction is built from the window's Jacobian (parameters mode) or from
    each micro-batch's representation gradients; k micro-batches of B still equal one batch of k·B."""
    big, small = ConflictNet(), ConflictNet(accumulate_grad_batches=4)
    mode = "representation" if representation else "parameters"
    s_big, s_small = UPGrad(mode=mode), UPGrad(mode=mode)
    trainer(max_epochs=2, callbacks=[s_big]).fit(big, loader(make_data(n=64), batch_size=32))
    trainer(max_epochs=2, callbacks=[s_small]).fit(small, loader(make_data(n=64), batch_size=8))
    torch.testing.assert_close(s_small.weights_tensor(), s_big.weights_tensor(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_params(small), flat_params(big), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("representation", [False, True])
def test_plain_heads_on_steps_that_reuse_the_weights(representation):
    """update_every=2: the second step reuses w but still gives the heads their plain gradient."""
    mode = "representation" if representation else "parameters"
    model = ConflictNet(lr=LR)
    data = make_data(n=2 * N)
    expected = copy.deepcopy(model)
    w = None
    for step in range(2):
        batch = data[step * N : (step + 1) * N]
        full, G, _, n_shared = _per_task(expected, batch, representation)
        if w is None:
            w = upgrad_weights(G.double()).float()
        grad = full.sum(0)
        grad[:n_shared] = (w @ full)[:n_shared]
        with torch.no_grad():
            for p, g in zip(expected.parameters(), _split(grad, expected)):
                p -= LR * g
    strategy = UPGrad(mode=mode, update_every=2)
    trainer(max_steps=2, callbacks=[strategy]).fit(model, loader(data, batch_size=N))
    torch.testing.assert_close(strategy.weights_tensor(), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_params(model), flat_params(expected), atol=1e-6, rtol=1e-5)


def _split(vector, module):
    out, offset = [], 0
    for p in module.parameters():
        out.append(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


class DeadTaskNet(TinyNet):
    """Task c's loss does not depend on the shared encoder: its shared gradient is zero, its head's is not."""

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        out = {t: nn.functional.mse_loss(self.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate("ab")}
        out["c"] = nn.functional.mse_loss(self.heads["c"](z.detach()).squeeze(1), y[:, 2])
        return out


def test_nash_without_solution_falls_back_to_ones_on_the_first_step():
    """No bargaining solution (a zero shared gradient): the first update uses α = 1 (the authors' initial
    α, kept when their solver fails), not the solver's diverging last iterate (which would multiply task
    c's head gradient by ~1e6)."""
    model = DeadTaskNet(lr=LR)
    strategy = NashMTL(max_norm=None)
    with pytest.warns(RuntimeWarning, match="did not converge.*using ones"):
        _one_step(strategy, model)
    torch.testing.assert_close(strategy.weights_tensor(), torch.ones(3))
    assert strategy.extra_metrics()["train/nash_mtl/converged"] == 0


# ------------------------------------------------------------------------------------------ resume parity
RESUMABLE = {
    "pcgrad": lambda: PCGrad(seed=11),
    "gradvac": lambda: GradVac(beta=0.3, seed=1),
    "nash": lambda: NashMTL(update_every=3),
}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_resume_matches_uninterrupted(tmp_path, name):
    data = loader(make_data(n=40), batch_size=8)
    straight, s_straight = ConflictNet(optimizer="adam", lr=0.01), RESUMABLE[name]()
    trainer(max_epochs=2, callbacks=[s_straight]).fit(straight, data)
    first = ConflictNet(optimizer="adam", lr=0.01)
    t1 = trainer(max_epochs=1, callbacks=[RESUMABLE[name]()])
    t1.fit(first, data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = ConflictNet(optimizer="adam", lr=0.01), RESUMABLE[name]()
    trainer(max_epochs=2, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.weights_tensor(), s_straight.weights_tensor(), atol=1e-6, rtol=0)
    state = torch.load(tmp_path / "half.ckpt", weights_only=True)["callbacks"]  # tensors and primitives only
    assert any(name.lower()[:4] in key.lower() for key in state)


def test_resume_restores_method_state():
    a = GradVac(beta=0.3, seed=1)
    model = ConflictNet()
    trainer(max_epochs=1, callbacks=[a]).fit(model, loader(make_data(n=32), batch_size=8))
    b = GradVac(beta=0.3, seed=1)
    b.bind(model.tasks)  # Lightning restores callback state after setup has bound the strategy
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.targets, a.targets) and b.targets.abs().sum() > 0
    assert torch.equal(b.generator.get_state(), a.generator.get_state())


# ------------------------------------------------------------------------------------------ bad input
class NoShared(TinyNet):
    def shared_parameters(self):
        return None


def test_no_shared_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match=r"NashMTL needs the shared parameters.*def shared_parameters"):
        trainer(max_steps=1, callbacks=[NashMTL()]).fit(NoShared(), loader(make_data(n=8)))


@pytest.mark.parametrize("strategy", [MGDA(mode="representation"), GradDrop()])
def test_unmarked_representation_is_a_clear_error(strategy):
    with pytest.raises(RuntimeError, match=r"shared_representation\(z\)"):
        trainer(max_steps=1, callbacks=[strategy]).fit(TinyNet(), loader(make_data(n=8)))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PCGrad(mode="features"), "mode must be 'parameters' or 'representation'"),
        (lambda: MGDA(update_every=0), "update_every must be an int >= 1, got 0"),
        (lambda: CAGrad(sync="global"), "sync must be 'exact' or 'local', got 'global'"),
        (lambda: MGDA(jacobian="vmap"), "'auto', 'batched' or 'loop'"),
        (lambda: MGDA("l1"), "normalization must be one of"),
        (lambda: CAGrad(c=-0.5), r"CAGrad c must be a finite number >= 0, got -0.5"),
        (lambda: CAGrad(rescale=3), "rescale must be 0, 1 or 2"),
        (lambda: NashMTL(max_norm=0), "max_norm must be a number > 0 or None"),
        (lambda: NashMTL(optim_niter=0), "optim_niter must be an int >= 1"),
        (lambda: GradVac(beta=2.0), r"beta must be a number in \[0, 1\], got 2.0"),
        (lambda: GradDrop(leak=1.5), r"leak values must be numbers in \[0, 1\]"),
        (lambda: UPGrad(reg_eps=0), "reg_eps must be a number > 0"),
        (lambda: UPGrad([1.0, -1.0]), "preference values must be finite numbers > 0"),
        (lambda: AlignedMTL("max"), "scale_mode must be one of"),
        (lambda: FairGrad(alpha=-1), "alpha must be a finite number >= 0, got -1"),
        (lambda: PCGrad(seed=1.5), "seed must be an int or None"),
    ],
)
def test_invalid_hyper_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_preference_must_name_the_tasks():
    with pytest.raises(ValueError, match=r"unknown: \['z'\], missing: \['c'\]"):
        trainer(max_steps=1, callbacks=[UPGrad({"a": 1.0, "b": 1.0, "z": 1.0})]).fit(
            TinyNet(), loader(make_data(n=8))
        )
    with pytest.raises(ValueError, match="2 values for 3 tasks"):
        trainer(max_steps=1, callbacks=[DualProj([1.0, 2.0])]).fit(TinyNet(), loader(make_data(n=8)))
