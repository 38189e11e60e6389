"""The Jacobian through the marked representation (``split_jacobian``): exact against the plain batched backward,
used only where every path from a loss to a shared parameter passes through the representation."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import flat_params, make_data, trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskModule
from lightning_mtl.gradients.jacobian import (
    SPLIT_MIN_TASKS,
    JacobianEngine,
    jacobian,
    split_jacobian,
    split_jacobians,
    split_plan,
)
from lightning_mtl.strategies import MGDA, PCGrad, SDMGrad, UPGrad
from lightning_mtl.strategies.modo import MoDo

jacobian_module = importlib.import_module(
    "lightning_mtl.gradients.jacobian"
)  # the package exports a function of that name

T = 12
assert SPLIT_MIN_TASKS <= T


def _graph(kind: str, seed: int = 0):
    """A trunk, a representation z and T losses: separate heads, one fused head, a skip connection around z, a
    shared layer after z, or z one output of a chunk whose other half reaches a head."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(10, 5, generator=g), torch.randn(10, T, generator=g)
    trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh())
    params = list(trunk.parameters())
    z = trunk(x)
    if kind == "heads":
        heads = [nn.Linear(6, 1) for _ in range(T)]
        rows = [((h(z).squeeze(1) - y[:, i]) ** 2).mean() for i, h in enumerate(heads)]
    elif kind == "fused":
        out = nn.Linear(6, T)(z)
        rows = [((out[:, i] - y[:, i]) ** 2).mean() for i in range(T)]
    elif kind == "skip":  # the first trunk layer also feeds the heads directly
        skip = trunk[0](x)
        rows = [((z[:, i % 6] + skip[:, i % 7] - y[:, i]) ** 2).mean() for i in range(T)]
    elif kind == "shared_after":
        after = nn.Linear(6, 6)
        params += list(after.parameters())
        w = after(z)
        rows = [((w[:, i % 6] - y[:, i]) ** 2).mean() for i in range(T)]
    elif kind == "chunk":
        both = trunk[0](x)
        z, other = both[:, :4].tanh(), both[:, 4:]
        z, other = torch.chunk(torch.cat([z, other], 1), 2, dim=1)
        rows = [((z[:, i % 3] * other[:, i % 3] - y[:, i]) ** 2).mean() for i in range(T)]
        params = list(trunk[0].parameters())
    else:
        raise AssertionError(kind)
    return z, rows, torch.stack(rows), params


@pytest.mark.parametrize(("kind", "plan"), [("heads", "per_task"), ("fused", "batched")])
def test_split_jacobian_equals_the_batched_backward(kind, plan):
    z, rows, losses, params = _graph(kind)
    assert split_plan(rows, z, params) == plan
    expected = jacobian(losses, params)
    for p in ("per_task", "batched"):  # either phase-one method is exact where the plan allows the split
        got = split_jacobian(losses, rows, z, params, p, scale=None)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    scaled = split_jacobian(losses, rows, z, params, plan, scale=1024.0)  # the AMP loss scale divides out
    torch.testing.assert_close(scaled, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["skip", "shared_after", "chunk"])
def test_no_split_where_a_parameter_is_reached_around_the_representation(kind):
    z, rows, losses, params = _graph(kind)
    assert split_plan(rows, z, params) is None
    # and the engine then computes the plain Jacobian, which differs from the (wrong) split one
    engine = JacobianEngine("auto")
    torch.testing.assert_close(engine(losses, params, rows=rows, through=z), jacobian(losses, params))
    wrong = split_jacobian(losses, rows, z, params, "batched")
    assert (wrong - jacobian(losses, params)).abs().max() > 1e-4


def test_a_leaf_representation_and_a_loss_without_graph_are_not_split():
    z = torch.randn(3, requires_grad=True)
    rows = [(z * i).sum() for i in range(T)]
    assert split_plan(rows, z, [z]) is None
    p = torch.randn((), requires_grad=True)
    w = p * torch.ones(3)
    assert split_plan([p] + [w.sum()] * (T - 1), w, [p]) is None


def test_the_loop_back_propagates_each_task_alone_with_rows():
    z, rows, losses, params = _graph("heads")
    torch.testing.assert_close(
        jacobian(losses, params, batched=False, rows=rows), jacobian(losses, params), atol=1e-6, rtol=1e-5
    )


def _parts(kind: str, k: int = 3):
    """``k`` disjoint batch parts through one trunk: each part its own forward (graph), representation and losses."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g), torch.randn(12, T, generator=g)
    trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh())
    heads = [nn.Linear(6, 1) for _ in range(T)] if kind == "heads" else nn.Linear(6, T)
    zs, rows = [], []
    for xp, yp in zip(x.chunk(k), y.chunk(k)):
        z = trunk(xp)
        outs = [h(z)[:, 0] for h in heads] if kind == "heads" else heads(z).unbind(1)  # own graphs, or one
        zs.append(z)
        rows.append([((out - yp[:, i]) ** 2).mean() for i, out in enumerate(outs)])
    return zs, rows, [torch.stack(r) for r in rows], list(trunk.parameters())


@pytest.mark.parametrize(("kind", "plan"), [("heads", "per_task"), ("fused", "batched")])
def test_the_parts_jacobians_together_equal_each_parts_own(kind, plan):
    # MoDo, SDMGrad: the parts' gradients at their representations in one backward per task (or one batched)
    zs, rows, losses, params = _parts(kind)
    assert {split_plan(r, z, params) for r, z in zip(rows, zs)} == {plan}
    expected = [jacobian(L, params) for L in losses]
    for scale in (None, 512.0):
        got = split_jacobians(losses, rows, zs, params, plan, scale=scale)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    got = JacobianEngine("auto").parts(losses, params, rows=rows, throughs=zs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_parts_whose_losses_mix_are_not_taken_together(monkeypatch):
    # part 1's losses also read part 0's representation: no split (the merged first phase would be wrong)
    zs, rows, _, params = _parts("heads", k=2)
    rows[1] = [r + zs[0].sum() * 0.1 for r in rows[1]]
    losses = [torch.stack(r) for r in rows]
    assert split_plan(rows[1], zs[1], params) is None
    calls = []
    monkeypatch.setattr(jacobian_module, "split_jacobians", lambda *a, **k: calls.append(1))
    got = JacobianEngine("auto").parts(losses, params, rows=rows, throughs=zs)
    assert not calls
    for a, L in zip(got, losses):
        torch.testing.assert_close(a, jacobian(L, params))


class ManyHeads(MultiTaskModule):
    """T separate heads on a marked representation (the split applies), or with a skip connection (it does not)."""

    def __init__(self, mark: bool = True, skip: bool = False) -> None:
        super().__init__(tasks=[f"t{i}" for i in range(T)])
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])
        self.mark, self.skip = mark, skip

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        if self.mark:
            z = self.shared_representation(z)
        extra = self.encoder[0](x)[:, :1] if self.skip else 0.0
        return {
            f"t{i}": ((h(z).squeeze(1) + extra.squeeze(1) if self.skip else h(z).squeeze(1)) - y[:, i % 3])
            .pow(2)
            .mean()
            for i, h in enumerate(self.heads)
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize(
    "strategy",
    [UPGrad, MGDA, PCGrad, MoDo, lambda: MoDo(samples=3), SDMGrad],
    ids=["UPGrad", "MGDA", "PCGrad", "MoDo", "MoDo-3", "SDMGrad"],
)
def test_training_through_the_split_equals_training_without_it(monkeypatch, strategy):
    # MoDo and SDMGrad: each batch part's Jacobian through that part's marked representation
    data = DataLoader(make_data(n=48), batch_size=16)
    calls = []
    real = jacobian_module.split_jacobians

    def counting(*args, **kwargs):
        calls.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(jacobian_module, "split_jacobians", counting)
    split = ManyHeads(mark=True)
    trainer(max_epochs=2, callbacks=[strategy()]).fit(split, data)
    assert calls and set(calls) == {"per_task"}
    calls.clear()
    plain = ManyHeads(mark=False)  # no representation: the plain batched backward
    trainer(max_epochs=2, callbacks=[strategy()]).fit(plain, data)
    assert not calls
    torch.testing.assert_close(flat_params(split), flat_params(plain), atol=1e-5, rtol=1e-5)


def test_a_skip_connection_keeps_the_plain_backward(monkeypatch):
    calls = []
    monkeypatch.setattr(jacobian_module, "split_jacobians", lambda *a, **k: calls.append(1))
    trainer(max_steps=2, callbacks=[UPGrad()]).fit(
        ManyHeads(mark=True, skip=True), DataLoader(make_data(n=32), batch_size=16)
    )
    assert not calls
