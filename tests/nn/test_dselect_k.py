"""DSelect-k against the paper and the official code: the smooth step at ±γ/2, selection weights on the simplex,
at most k non-zero weights once the selectors saturate, the entropy / non-power-of-2 auxiliary loss (returned,
never backpropagated in forward), exact shared parameters (autograd) and training with a gradient strategy."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import loader, make_data, trainer
from torch import nn

from lightning_mtl import MultiTaskModule
from lightning_mtl.nn.dselect_k import (
    DSelectK,
    DSelectKGate,
    binary_codes,
    dselect_k_regularizer,
    selector_outputs,
    smooth_step,
)
from lightning_mtl.strategies.pcgrad import PCGrad

TASKS = ("a", "b", "c")


# ---------------------------------------------------------------------------------------------------- the math
@pytest.mark.parametrize("gamma", [1.0, 2.0, 0.5])
def test_smooth_step_values_and_derivatives(gamma):
    t = torch.tensor([-gamma, -gamma / 2, 0.0, gamma / 2, gamma], requires_grad=True)
    s = smooth_step(t, gamma)
    assert s.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    (grad,) = torch.autograd.grad(s.sum(), t)
    assert grad[[0, 1, 3, 4]].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert grad[2].item() == pytest.approx(3 / (2 * gamma))  # S'(0) = 3/(2γ)
    # C¹ at the knots: the polynomial's value tends to 0 / 1 and its slope to 0 just inside ±γ/2
    h = 1e-3 * gamma
    inside = torch.tensor([-gamma / 2 + h, gamma / 2 - h], dtype=torch.float64, requires_grad=True)
    s_in = smooth_step(inside, gamma)
    assert s_in[0].item() == pytest.approx(0.0, abs=1e-5) and s_in[1].item() == pytest.approx(1.0, abs=1e-5)
    (g_in,) = torch.autograd.grad(s_in.sum(), inside)
    assert g_in.abs().max().item() < 1e-2 / gamma
    # symmetry S(t) + S(−t) = 1 and monotonicity
    u = torch.linspace(-gamma, gamma, 101)
    torch.testing.assert_close(smooth_step(u, gamma) + smooth_step(-u, gamma), torch.ones(101))
    assert (smooth_step(u, gamma).diff() >= 0).all()


def test_binary_codes_are_msb_first():
    assert binary_codes(5).int().tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert binary_codes(2).int().tolist() == [[0], [1]]


def test_selector_by_hand():
    # m = 2, z = (z1, z2), S(z1) = a, S(z2) = b: r = [(1-a)(1-b), (1-a)b, a(1-b), ab] for codes 00, 01, 10, 11
    z = torch.tensor([[0.25, -0.1]])
    a, b = smooth_step(z[0, 0]).item(), smooth_step(z[0, 1]).item()
    r = selector_outputs(z, binary_codes(4))
    expected = [(1 - a) * (1 - b), (1 - a) * b, a * (1 - b), a * b]
    torch.testing.assert_close(r, torch.tensor([expected]))


def test_regularizer_by_hand():
    r = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # k = 2 static selectors, n = 4
    h = -2 * 0.5 * math.log(0.5 + 1e-6) - 1.0 * math.log(1 + 1e-6)
    assert dselect_k_regularizer(r, 4, entropy_reg=0.1).item() == pytest.approx(0.1 * h)
    # n = 3 (not a power of 2): + Σ_i (1/Σ_j r_ij − 1); selector sums 0.8 and 1.0
    r3 = torch.tensor([[0.4, 0.4, 0.0], [0.0, 0.0, 1.0]])
    h3 = -2 * 0.4 * math.log(0.4 + 1e-6) - math.log(1 + 1e-6)
    assert dselect_k_regularizer(r3, 3, entropy_reg=0.1).item() == pytest.approx(0.1 * h3 + (1 / 0.8 - 1))
    # per example: the mean over the batch
    batch = torch.stack([r3, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])])
    per = [dselect_k_regularizer(batch[i], 3, entropy_reg=0.1) for i in range(2)]
    assert dselect_k_regularizer(batch, 3, entropy_reg=0.1).item() == pytest.approx(
        (per[0] + per[1]).item() / 2
    )


# ---------------------------------------------------------------------------------------------------- the gate
@pytest.mark.parametrize("n", [2, 4, 8, 16])
@pytest.mark.parametrize("per_example", [True, False])
def test_weights_sum_to_one_for_powers_of_two(n, per_example):
    torch.manual_seed(n)
    gate = DSelectKGate(n, k=2, in_features=5 if per_example else None)
    with torch.no_grad():  # move the selectors away from their near-uniform initialisation
        for p in gate.parameters():
            p.uniform_(-0.4, 0.4)
    q, r = gate(torch.randn(6, 5))
    assert q.shape == ((6, n) if per_example else (n,))
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(-1), torch.ones(q.shape[:-1]))
    torch.testing.assert_close(r.sum(-1), torch.ones(r.shape[:-1]))


def test_weights_without_a_power_of_two_sum_to_at_most_one_and_the_extra_term_sees_it():
    torch.manual_seed(0)
    gate = DSelectKGate(5, k=2)
    q, r = gate()
    assert (q.sum() < 1).item() and (q >= 0).all()
    assert dselect_k_regularizer(r, 5, entropy_reg=0.0).item() > 0  # the lost mass is penalised
    assert dselect_k_regularizer(r, 8, entropy_reg=0.0).item() == 0.0  # (no such term for a power of 2)


def _saturate(z: torch.Tensor, codes: list[int], m: int, big: float = 10.0) -> None:
    """Set selector rows ``z[..., i, :]`` to ±big so that selector i picks expert codes[i]."""
    for i, c in enumerate(codes):
        bits = [(c >> (m - 1 - bit)) & 1 for bit in range(m)]
        z[..., i, :] = torch.tensor([big if b else -big for b in bits])


@pytest.mark.parametrize(
    "n, k, picks", [(8, 2, [5, 2]), (8, 3, [1, 1, 6]), (5, 2, [4, 0]), (16, 4, [3, 9, 12, 15])]
)
def test_at_most_k_experts_once_the_selectors_saturate(n, k, picks):
    torch.manual_seed(1)
    m = math.ceil(math.log2(n))
    # static gate
    gate = DSelectKGate(n, k=k)
    with torch.no_grad():
        _saturate(gate.z_logits.data, picks, m)
    q, r = gate()
    assert int((q != 0).sum()) == len(set(picks)) <= k
    w = torch.softmax(gate.w_logits, -1).detach()
    expected = torch.zeros(n)
    for i, c in enumerate(picks):
        expected[c] += w[i]
    torch.testing.assert_close(q.detach(), expected)
    assert q.sum().item() == pytest.approx(1.0)
    assert dselect_k_regularizer(r, n).abs().item() < 1e-10  # one-hot selectors: no entropy, no lost mass
    # per-example gate: zero weights, saturated bias
    gate = DSelectKGate(n, k=k, in_features=3)
    with torch.no_grad():
        gate.z_logits.weight.zero_()
        bias = torch.zeros(k, m)
        _saturate(bias, picks, m)
        gate.z_logits.bias.copy_(bias.flatten())
    q, _ = gate(torch.randn(4, 3))
    assert ((q != 0).sum(-1) <= k).all()
    assert set((q[0] != 0).nonzero().flatten().tolist()) == set(picks)
    torch.testing.assert_close(q.sum(-1), torch.ones(4))


def test_initialisation_follows_the_official_code():
    torch.manual_seed(2)
    gate = DSelectKGate(8, k=2, in_features=30, gamma=2.0)
    for p in gate.z_logits.parameters():
        assert p.abs().max().item() <= 2.0 / 100
    for p in gate.w_logits.parameters():
        assert p.abs().max().item() <= 0.05
    static = DSelectKGate(8, k=3)
    assert static.z_logits.shape == (3, 3) and static.w_logits.shape == (3,)
    assert static.z_logits.abs().max().item() <= 1 / 100


# ---------------------------------------------------------------------------------------------------- the architecture
def test_dselect_k_forward_shapes_gates_and_aux_losses():
    torch.manual_seed(3)
    arch = DSelectK(TASKS, 6, k=2, num_experts=4, out_features={"a": 1, "b": 2, "c": 3})
    x = torch.randn(5, 6)
    out = arch(x)
    assert [tuple(out[t].shape) for t in TASKS] == [(5, 1), (5, 2), (5, 3)]
    assert arch.representation_unsupported
    for t in TASKS:
        q = arch.last_gates[t]
        assert q.shape == (5, 4) and not q.requires_grad
        torch.testing.assert_close(q.sum(-1), torch.ones(5))
        mix = sum(q[:, i : i + 1] * arch.experts[i](x) for i in range(4))
        torch.testing.assert_close(out[t], arch.towers[t](mix))
        aux = arch.aux_losses[t]
        assert aux.dim() == 0 and aux.requires_grad
        _, r = arch.gates[t](x)
        torch.testing.assert_close(aux, dselect_k_regularizer(r, 4, 1e-6))
    torch.testing.assert_close(arch.auxiliary_loss(), sum(arch.aux_losses.values()))


def test_forward_never_calls_backward_and_aux_reaches_only_its_gate():
    torch.manual_seed(4)
    arch = DSelectK(TASKS, 6, k=2, num_experts=5, entropy_reg=1e-2)
    arch(torch.randn(8, 6))
    assert all(p.grad is None for p in arch.parameters())  # LibMTL calls backward in forward; we do not
    params = list(arch.parameters())
    grads = torch.autograd.grad(arch.aux_losses["b"], params, allow_unused=True)
    touched = {id(p) for p, g in zip(params, grads) if g is not None and g.abs().sum() > 0}
    assert touched and touched <= {id(p) for p in arch.gates["b"].parameters()}


def test_static_gates():
    torch.manual_seed(5)
    arch = DSelectK(["a", "b"], 4, k=1, num_experts=3, per_example=False)
    out = arch(torch.randn(3, 4))
    assert out["a"].shape == (3, 1)
    assert arch.last_gates["a"].shape == (3,)
    assert arch.aux_losses["a"].item() > 0  # n = 3: reachable mass < 1 at initialisation


@pytest.mark.parametrize("per_example", [True, False])
def test_shared_parameters_are_exactly_the_experts(per_example):
    torch.manual_seed(6)
    arch = DSelectK(TASKS, 6, k=2, num_experts=4, per_example=per_example)
    params = list(arch.parameters())
    out = arch(torch.randn(32, 6))
    counts: dict[int, int] = {}
    for t in TASKS:
        grads = torch.autograd.grad(out[t].sum(), params, retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None and g.abs().sum() > 0:
                counts[id(p)] = counts.get(id(p), 0) + 1
    shared = {id(p) for p in arch.shared_parameters()}
    assert shared == {i for i, c in counts.items() if c >= 2}
    assert shared == {id(p) for p in arch.experts.parameters()}
    assert {id(p) for p in arch.task_parameters()} == {id(p) for p in params} - shared


def test_construction_is_seed_reproducible_and_images_work():
    torch.manual_seed(7)
    a = DSelectK(["a", "b"], (3, 8, 8), k=2, num_experts=3, expert_hidden=(4,)).state_dict()
    torch.manual_seed(7)
    b = DSelectK(["a", "b"], (3, 8, 8), k=2, num_experts=3, expert_hidden=(4,))
    assert all(torch.equal(v, b.state_dict()[key]) for key, v in a.items())
    assert b(torch.randn(2, 3, 8, 8))["a"].shape == (2, 1)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(k=0), ["k", "0"]),
        (dict(k=5, num_experts=4), ["k", "num_experts=4", "5"]),
        (dict(k=1, num_experts=1), ["num_experts >= 2", "1"]),
        (dict(k=1, gamma=0.0), ["gamma", "0.0"]),
        (dict(k=1, entropy_reg=-1.0), ["entropy_reg", "-1.0"]),
        (dict(k=1, per_example="yes"), ["per_example", "'yes'"]),
        (dict(k=1, experts=lambda: nn.Linear(6, 6), num_experts=2), ["expert_out_features"]),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, words):
    with pytest.raises(ValueError) as info:
        DSelectK(["a", "b"], 6, **kwargs)
    for w in words:
        assert w in str(info.value)


def test_auxiliary_loss_before_forward_is_a_clear_error():
    with pytest.raises(RuntimeError, match="forward"):
        DSelectK(["a"], 4, k=1, num_experts=2).auxiliary_loss()


# ---------------------------------------------------------------------------------------------------- training
class DSelectNet(MultiTaskModule):
    def __init__(self, arch: DSelectK) -> None:
        super().__init__(tasks=list(arch.task_names))
        self.arch = arch

    def shared_parameters(self):
        return self.arch.shared_parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        out = self.arch(x)
        return {
            t: nn.functional.mse_loss(out[t].squeeze(1), y[:, i]) + self.arch.aux_losses[t]
            for i, t in enumerate(self.task_names)
        }

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_trains_with_pcgrad_and_the_auxiliary_loss():
    torch.manual_seed(0)
    ds = make_data(n=64)
    model = DSelectNet(DSelectK(TASKS, 6, k=2, num_experts=4, entropy_reg=1e-3))

    def loss() -> float:
        with torch.no_grad():
            return sum(v.item() for v in model.task_losses(ds.tensors, 0).values())

    before = loss()
    trainer(max_epochs=3, callbacks=[PCGrad(seed=0)]).fit(model, loader(ds))
    assert loss() < 0.5 * before
