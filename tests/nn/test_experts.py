"""MMoE, CGC and PLE against their papers' invariants: gates on the simplex, one expert = hard sharing, task t
never reads task u's experts in CGC (PLE: only through the shared gate of lower levels), PLE(1 level) = CGC,
``shared_parameters()`` = exactly the parameters ≥ 2 tasks' outputs reach (autograd), and training through a
``MultiTaskModule`` with a gradient strategy."""

from __future__ import annotations

import math

import pytest
import torch
from arch_helpers import reached
from helpers import loader, make_data, trainer
from torch import nn

from lightning_mtl import MultiTaskModule
from lightning_mtl.nn.experts import CGC, PLE, MMoE, gate_entropy
from lightning_mtl.strategies.mgda import MGDA
from lightning_mtl.strategies.pcgrad import PCGrad

TASKS = ("a", "b", "c")


def assert_shared_set_exact(arch, x: torch.Tensor) -> None:
    by_task = reached(arch, x)
    counts: dict[int, int] = {}
    for ids in by_task.values():
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    names = {id(p): n for n, p in arch.named_parameters()}
    expected = {i for i, c in counts.items() if c >= 2}
    shared = {id(p) for p in arch.shared_parameters()}
    assert shared == expected, (
        f"declared but not reached by >= 2 tasks: {sorted(names[i] for i in shared - expected)}; "
        f"reached by >= 2 tasks but not declared: {sorted(names[i] for i in expected - shared)}"
    )
    task = {id(p) for p in arch.task_parameters()}
    assert task == {id(p) for p in arch.parameters()} - shared
    assert all(counts.get(i, 0) >= 1 for i in task), "every task parameter is reached by some task"


def assert_on_simplex(gates: dict[str, torch.Tensor]) -> None:
    for key, g in gates.items():
        assert (g >= 0).all(), key
        torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[:-1]), msg=key)


# ---------------------------------------------------------------------------------------------------- MMoE
def test_mmoe_shapes_gates_and_defaults():
    torch.manual_seed(0)
    arch = MMoE(TASKS, input_shape=6, out_features={"a": 1, "b": 3, "c": 2})
    assert arch.num_experts == 8 and len(arch.experts) == 8  # the paper's 8 experts
    out = arch(torch.randn(5, 6))
    assert list(out) == list(TASKS)
    assert [tuple(out[t].shape) for t in TASKS] == [(5, 1), (5, 3), (5, 2)]
    assert set(arch.last_gates) == set(TASKS)
    assert all(g.shape == (5, 8) and not g.requires_grad for g in arch.last_gates.values())
    assert_on_simplex(arch.last_gates)
    assert arch.representation_unsupported and "mixture" in arch.representation_unsupported


def test_mmoe_gate_is_softmax_of_linear_with_bias_and_mixes_experts():
    torch.manual_seed(1)
    arch = MMoE(["a", "b"], input_shape=4, num_experts=3, expert_hidden=(5,))
    x = torch.randn(7, 4)
    out = arch(x)
    for t in ("a", "b"):
        lin = arch.gates[t].linear
        assert lin.bias is not None
        g = torch.softmax(x @ lin.weight.T + lin.bias, dim=-1)
        torch.testing.assert_close(arch.last_gates[t], g)
        mix = sum(g[:, i : i + 1] * arch.experts[i](x) for i in range(3))
        torch.testing.assert_close(out[t], arch.towers[t](mix))


def test_mmoe_one_expert_is_hard_sharing():
    torch.manual_seed(2)
    arch = MMoE(TASKS, input_shape=6, num_experts=1)
    x = torch.randn(9, 6)
    out = arch(x)
    z = arch.experts[0](x)  # the single shared trunk
    for t in TASKS:
        assert torch.equal(arch.last_gates[t], torch.ones(9, 1))
        torch.testing.assert_close(out[t], arch.towers[t](z))


def test_mmoe_shared_parameters_are_exactly_the_experts():
    torch.manual_seed(3)
    arch = MMoE(TASKS, input_shape=6, num_experts=4)
    assert_shared_set_exact(arch, torch.randn(32, 6))
    assert {id(p) for p in arch.shared_parameters()} == {id(p) for p in arch.experts.parameters()}


def test_mmoe_images_and_user_modules():
    torch.manual_seed(4)
    arch = MMoE(["a", "b"], input_shape=(3, 8, 8), num_experts=2, expert_hidden=(4, 6))
    out = arch(torch.randn(2, 3, 8, 8))
    assert out["a"].shape == (2, 1)
    assert_on_simplex(arch.last_gates)
    # the user's experts (instances) and towers (factory); feature maps are mixed element-wise
    experts = [nn.Conv2d(3, 4, 3, padding=1) for _ in range(3)]
    arch = MMoE(
        ["a", "b"],
        input_shape=(3, 8, 8),
        experts=experts,
        towers=lambda t: nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 2)),
    )
    assert arch.num_experts == 3 and arch.experts[0] is experts[0]
    assert arch(torch.randn(2, 3, 8, 8))["b"].shape == (2, 2)
    # custom experts + default towers: the towers' width comes from expert_out_features
    arch = MMoE(["a", "b"], 5, experts=lambda: nn.Linear(5, 7), num_experts=2, expert_out_features=7)
    assert arch(torch.randn(3, 5))["a"].shape == (3, 1)
    # nn.ModuleList experts and nn.ModuleDict towers are accepted as they are
    arch = MMoE(
        ["a", "b"],
        5,
        experts=nn.ModuleList([nn.Linear(5, 3) for _ in range(2)]),
        towers=nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 2)}),
    )
    assert arch.num_experts == 2 and arch(torch.randn(3, 5))["b"].shape == (3, 2)


def test_construction_is_seed_reproducible():
    for make in (
        lambda: MMoE(TASKS, 6, num_experts=3),
        lambda: CGC(TASKS, 6, num_task_experts=2),
        lambda: PLE(TASKS, 6, num_levels=3),
    ):
        torch.manual_seed(11)
        first = make().state_dict()
        torch.manual_seed(11)
        second = make().state_dict()
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: MMoE(["a"], 0), ["input_shape", "0"]),
        (lambda: MMoE(["a"], (3, 8)), ["input_shape", "(C, H, W)"]),
        (lambda: MMoE(["a"], 4, num_experts=0), ["num_experts", "0"]),
        (lambda: MMoE(["a"], 4, expert_hidden=()), ["expert_hidden"]),
        (lambda: MMoE(["a"], 4, experts=[nn.Linear(4, 4)] * 2), ["distinct", "factory"]),
        (lambda: MMoE(["a"], 4, experts=[nn.Linear(4, 4)], num_experts=2), ["num_experts=2", "1 expert"]),
        (lambda: MMoE(["a"], 4, experts=lambda: nn.Linear(4, 4)), ["expert_out_features"]),
        (lambda: MMoE(["a", "b"], 4, towers={"a": nn.Linear(16, 1)}), ["towers", "missing ['b']"]),
        (lambda: MMoE(["a", "b"], 4, out_features={"a": 1, "z": 2}), ["out_features", "'z'"]),
        (lambda: MMoE(["a"], 4, towers=nn.Linear(16, 1)), ["towers", "Linear"]),
        (lambda: CGC(["a"], 4, num_shared_experts=0), ["num_shared_experts", "0"]),
        (lambda: CGC(["a"], 4, num_task_experts=-1), ["num_task_experts", "-1"]),
        (lambda: PLE(["a"], 4, num_levels=0), ["num_levels", "0"]),
        (lambda: PLE(["a"], 4, expert=nn.Linear(4, 4)), ["factory", "Linear"]),
        (lambda: PLE(["a"], 4, expert=lambda level: nn.Linear(4, 4)), ["expert_out_features"]),
        (lambda: MMoE([], 4), ["tasks"]),
    ],
)
def test_bad_arguments_name_the_argument(make, words):
    with pytest.raises(ValueError) as info:
        make()
    for w in words:
        assert w in str(info.value)


def test_wrong_input_size_is_a_clear_error():
    arch = MMoE(["a"], 4, num_experts=2)
    with pytest.raises(ValueError, match="input_shape"):
        arch(torch.randn(2, 5))


def test_gate_entropy():
    assert gate_entropy(torch.full((3, 4), 0.25)).item() == pytest.approx(math.log(4))
    assert gate_entropy(torch.tensor([[1.0, 0.0, 0.0]])).item() == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------- CGC
def test_cgc_task_gate_mixes_only_its_own_and_the_shared_experts():
    torch.manual_seed(5)
    arch = CGC(TASKS, input_shape=6, num_task_experts=2, num_shared_experts=3)
    x = torch.randn(8, 6)
    out = arch(x)
    level = arch.levels[0]
    assert level.shared_gate is None
    assert set(arch.last_gates) == set(TASKS)
    assert all(g.shape == (8, 2 + 3) for g in arch.last_gates.values())
    assert_on_simplex(arch.last_gates)
    for t in TASKS:  # by hand: softmax(W x + b) over [own experts; shared experts]
        lin = level.task_gates[t].linear
        w = torch.softmax(x @ lin.weight.T + lin.bias, -1)
        experts = list(level.task_experts[t]) + list(level.shared_experts)
        mix = sum(w[:, i : i + 1] * e(x) for i, e in enumerate(experts))
        torch.testing.assert_close(out[t], arch.towers[t](mix))


def test_cgc_task_output_does_not_depend_on_other_tasks_experts():
    torch.manual_seed(6)
    arch = CGC(TASKS, input_shape=6, num_task_experts=2, num_shared_experts=1)
    by_task = reached(arch, torch.randn(16, 6))
    for t in TASKS:
        for u in TASKS:
            ids = {id(p) for p in arch.levels[0].task_experts[u].parameters()}
            if u == t:
                assert ids <= by_task[t]
            else:
                assert not ids & by_task[t], f"task {t} reads task {u}'s experts"
    assert_shared_set_exact(arch, torch.randn(16, 6))
    assert {id(p) for p in arch.shared_parameters()} == {
        id(p) for p in arch.levels[0].shared_experts.parameters()
    }


# ---------------------------------------------------------------------------------------------------- PLE
def test_ple_with_one_level_is_cgc():
    torch.manual_seed(7)
    cgc = CGC(TASKS, 6, num_task_experts=2, num_shared_experts=2)
    torch.manual_seed(7)
    ple = PLE(TASKS, 6, num_levels=1, num_task_experts=2, num_shared_experts=2)
    assert cgc.state_dict().keys() == ple.state_dict().keys()
    assert all(torch.equal(v, ple.state_dict()[k]) for k, v in cgc.state_dict().items())
    x = torch.randn(4, 6)
    a, b = cgc(x), ple(x)
    assert all(torch.equal(a[t], b[t]) for t in TASKS)
    assert cgc.last_gates.keys() == ple.last_gates.keys()
    assert {id(p) for p in ple.shared_parameters()} == {
        id(p) for p in ple.levels[0].shared_experts.parameters()
    }


def test_ple_levels_and_gates():
    torch.manual_seed(8)
    arch = PLE(TASKS, 6, num_levels=3, num_task_experts=2, num_shared_experts=1)
    out = arch(torch.randn(5, 6))
    assert [tuple(out[t].shape) for t in TASKS] == [(5, 1)] * 3
    assert [lvl.shared_gate is not None for lvl in arch.levels] == [True, True, False]
    expected = {f"level{j}/{k}" for j in (0, 1) for k in (*TASKS, "shared")} | set(TASKS)
    assert set(arch.last_gates) == expected
    assert arch.last_gates["level0/shared"].shape == (5, 3 * 2 + 1)  # all experts
    assert arch.last_gates["a"].shape == (5, 2 + 1)  # own + shared
    assert_on_simplex(arch.last_gates)


def test_ple_shared_experts_run_once_per_level():
    """LibMTL reruns the shared experts on every task's stream; here they run once, on the shared stream."""
    torch.manual_seed(9)
    arch = PLE(TASKS, 6, num_levels=2)
    calls = []
    for j, level in enumerate(arch.levels):
        for e in level.shared_experts:
            e.register_forward_hook(lambda m, i, o, j=j: calls.append(j))
    arch(torch.randn(3, 6))
    assert calls == [0, 1]


def test_ple_shared_set_and_task_separation_by_autograd():
    """With N levels the shared gates of levels < N-1 mix every task's experts into the shared stream, so the lower
    levels' task experts (and the task gates below the last two levels) reach every task: they are shared. The
    last level's task experts are read by their task only."""
    torch.manual_seed(10)
    arch = PLE(TASKS, 6, num_levels=3, num_task_experts=1, num_shared_experts=2)
    x = torch.randn(32, 6)
    assert_shared_set_exact(arch, x)
    by_task = reached(arch, x)
    last = arch.levels[-1]
    for t in TASKS:
        for u in TASKS:
            if u != t:
                assert not {id(p) for p in last.task_experts[u].parameters()} & by_task[t]
                assert not {id(p) for p in last.task_gates[u].parameters()} & by_task[t]
                assert not {id(p) for p in arch.levels[1].task_gates[u].parameters()} & by_task[t]
                # through level 0's shared gate, task t does read task u's level-0 experts (the paper's design)
                assert {id(p) for p in arch.levels[0].task_experts[u].parameters()} <= by_task[t]


def test_ple_images_and_custom_expert_factory():
    torch.manual_seed(12)
    arch = PLE(["a", "b"], (3, 8, 8), num_levels=2, expert_hidden=(4,))
    assert arch(torch.randn(2, 3, 8, 8))["a"].shape == (2, 1)

    def expert(level: int) -> nn.Module:  # a conv trunk at level 0, a small MLP above
        if level == 0:
            return nn.Sequential(
                nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 64, 10)
            )
        return nn.Sequential(nn.Linear(10, 10), nn.ReLU())

    arch = PLE(["a", "b"], (3, 8, 8), expert=expert, expert_out_features=10, out_features=3)
    assert arch(torch.randn(2, 3, 8, 8))["b"].shape == (2, 3)
    assert_shared_set_exact(arch, torch.randn(8, 3, 8, 8))


# ---------------------------------------------------------------------------------------------------- training
class ArchNet(MultiTaskModule):
    def __init__(self, arch: nn.Module, lr: float = 0.05) -> None:
        super().__init__(tasks=list(arch.task_names))
        self.arch = arch
        self.lr = lr

    def shared_parameters(self):
        return self.arch.shared_parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        out = self.arch(x)
        return {t: nn.functional.mse_loss(out[t].squeeze(1), y[:, i]) for i, t in enumerate(self.task_names)}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def total_loss(model: ArchNet, ds) -> float:
    with torch.no_grad():
        x, y = ds.tensors
        return sum(v.item() for v in model.task_losses((x, y), 0).values())


@pytest.mark.parametrize(
    "make, strategy",
    [
        (lambda: MMoE(TASKS, 6, num_experts=4), PCGrad(seed=0)),
        (lambda: CGC(TASKS, 6), MGDA()),
        (lambda: PLE(TASKS, 6, num_levels=2), PCGrad(seed=0)),
    ],
    ids=["mmoe-pcgrad", "cgc-mgda", "ple-pcgrad"],
)
def test_trains_with_a_gradient_strategy(make, strategy):
    torch.manual_seed(0)
    ds = make_data(n=64)
    model = ArchNet(make())
    before = total_loss(model, ds)
    trainer(max_epochs=3, callbacks=[strategy]).fit(model, loader(ds))
    after = total_loss(model, ds)
    assert after < 0.5 * before, (before, after)
