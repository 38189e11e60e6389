"""The per-task gradient engine: batched and looped Jacobians equal per-task autograd; helpers."""

from __future__ import annotations

import pytest
import torch
from helpers import RepTinyNet, TinyNet, make_data
from torch import nn

from lightning_mtl.gradients import (
    JacobianEngine,
    gramian,
    jacobian,
    marked_representation,
    shared_parameters_of,
    unflatten,
)
from lightning_mtl.step import reduce_mean


def _losses(model: TinyNet):
    x, y = make_data(n=10)[:]
    losses = model.task_losses((x, y), 0)
    return torch.stack([losses[t] for t in model.task_names])


def _reference(losses: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])
        )
    return torch.stack(rows)


@pytest.mark.parametrize("batched", [True, False])
def test_jacobian_equals_per_task_autograd(batched):
    model = TinyNet()
    losses = _losses(model)
    params = list(model.encoder.parameters())
    J = jacobian(losses, params, batched=batched)
    assert J.shape == (3, sum(p.numel() for p in params))  # heads excluded
    torch.testing.assert_close(J, _reference(losses, params), atol=1e-6, rtol=1e-6)
    # the graph is retained: the combined backward still works afterwards
    losses.sum().backward()
    assert model.heads["a"].weight.grad is not None


def test_unused_parameters_give_zero_columns():
    model = TinyNet()
    unused = nn.Parameter(torch.ones(4))
    losses = _losses(model)
    params = [*model.encoder.parameters(), unused, *model.heads["a"].parameters()]
    for batched in (True, False):
        J = jacobian(losses, params, batched=batched)
        offset = sum(p.numel() for p in model.encoder.parameters())
        assert torch.equal(J[:, offset : offset + 4], torch.zeros(3, 4))
        # a head is reached by its own task only
        head = J[:, offset + 4 :]
        assert head[0].abs().sum() > 0 and torch.equal(head[1:], torch.zeros_like(head[1:]))


def test_scale_is_removed():
    model = TinyNet()
    losses = _losses(model)
    params = list(model.encoder.parameters())
    torch.testing.assert_close(
        jacobian(losses, params, scale=1024.0), jacobian(losses, params), rtol=1e-6, atol=1e-7
    )


def test_representation_gradients_and_gramian():
    model = TinyNet()
    x, y = make_data(n=10)[:]
    z = model.encoder(x)
    losses = torch.stack(
        [nn.functional.mse_loss(model.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate("abc")]
    )
    R = jacobian(losses, [z]).reshape(3, *z.shape)
    for i in range(3):
        (g,) = torch.autograd.grad(losses[i], z, retain_graph=True)
        torch.testing.assert_close(R[i], g)
    flat = R.reshape(3, -1)
    G = gramian(R)
    assert G.dtype == torch.float64
    torch.testing.assert_close(G, (flat @ flat.T).double(), rtol=1e-5, atol=1e-6)


class _ItemInBackward(torch.autograd.Function):
    """Identity whose backward calls .item(): fine per task, impossible under vmap (batched backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * (1.0 + 0.0 * grad.sum().item())


def test_engine_falls_back_to_a_loop_once_with_a_warning():
    model = TinyNet()
    x, y = make_data(n=10)[:]
    z = _ItemInBackward.apply(model.encoder(x))
    losses = torch.stack(
        [nn.functional.mse_loss(model.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate("abc")]
    )
    params = list(model.encoder.parameters())
    engine = JacobianEngine("auto", owner="Test")
    with pytest.warns(UserWarning, match="Test: the batched"):
        J = engine(losses, params)
    assert engine.batched is False
    torch.testing.assert_close(J, _reference(losses, params), atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError):
        JacobianEngine("batched")(losses, params)
    with pytest.raises(ValueError, match="'auto', 'batched' or 'loop'"):
        JacobianEngine("vmap")


def test_grad_helpers_round_trip():
    params = [nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4))]
    v = torch.arange(10.0)
    assert [t.shape for t in unflatten(v, params)] == [(2, 3), (4,)]
    with pytest.raises(ValueError, match="11 elements, the parameters 10"):
        unflatten(torch.zeros(11), params)
    assert torch.equal(reduce_mean(None, v), v)


class _NoShared(TinyNet):
    def shared_parameters(self):
        return None


def test_missing_shared_parameters_and_representation_errors():
    with pytest.raises(ValueError, match=r"PCGrad needs the shared parameters.*shared_parameters\(\)"):
        shared_parameters_of(_NoShared(), "PCGrad")
    model = TinyNet()
    assert len(shared_parameters_of(model, "X")) == 2
    with pytest.raises(
        RuntimeError,
        match=r"MGDA needs the shared representation.*self.shared_representation.*mode='parameters'",
    ):
        marked_representation(model, "MGDA")
    rep = RepTinyNet()
    rep._shared_representation = torch.zeros(3)
    with pytest.raises(RuntimeError, match="does not require grad"):
        marked_representation(rep, "MGDA")
