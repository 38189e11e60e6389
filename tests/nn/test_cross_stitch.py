"""CrossStitch (Misra et al., CVPR 2016): the paper's initialisation, the output at init against a manual mix of
independent columns, α = I as independent networks, per-channel units, the shared set by autograd, α's parameter
groups, bad input, training."""

from __future__ import annotations

import pytest
import torch
from arch_helpers import ArchModule, HeldModule, check_sharing
from helpers import trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.nn.base import default_conv_stack
from lightning_mtl.nn.cross_stitch import CrossStitch, cross_stitch_init
from lightning_mtl.strategies import MGDA, PCGrad


def manual_mix(alpha: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """x̃_t = Σ_s α_ts y_s (α: (T, T)), or per channel c with α[c] (α: (C, T, T)), written as loops."""
    out = []
    for t in range(len(ys)):
        if alpha.dim() == 2:
            out.append(sum(alpha[t, s] * ys[s] for s in range(len(ys))))
        else:
            shape = (1, -1) + (1,) * (ys[0].dim() - 2)
            out.append(sum(alpha[:, t, s].view(shape) * ys[s] for s in range(len(ys))))
    return out


# ------------------------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_init_is_the_papers_diagonal_with_rows_summing_to_one(num_tasks):
    alpha = cross_stitch_init(num_tasks, 0.9)
    assert torch.allclose(alpha.diagonal(), torch.full((num_tasks,), 0.9))
    off = alpha[~torch.eye(num_tasks, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, 0.1 / (num_tasks - 1)))
    assert torch.allclose(alpha.sum(1), torch.ones(num_tasks))
    arch = CrossStitch([f"t{i}" for i in range(num_tasks)], in_features=4, widths=(3, 3))
    assert len(arch.alpha_parameters()) == 2 and all(torch.equal(a, alpha) for a in arch.alpha_parameters())
    assert torch.equal(cross_stitch_init(1, 0.9), torch.ones(1, 1))


@pytest.mark.parametrize("per_channel", [False, True])
def test_output_at_init_equals_independent_columns_mixed_by_alpha(per_channel):
    torch.manual_seed(0)
    tasks = ["a", "b", "c"]
    stages = [lambda: default_conv_stack(2, [3]), lambda: default_conv_stack(3, [4])]  # columns differ
    arch = CrossStitch(tasks, stages, widths=(3, 4), per_channel=per_channel)
    if per_channel:
        assert [tuple(a.shape) for a in arch.alpha_parameters()] == [(3, 3, 3), (4, 3, 3)]
    arch.eval()  # BatchNorm on running statistics: each column is a fixed function
    x = torch.randn(2, 2, 8, 8)
    hs = [x, x, x]
    for i, alpha in enumerate(arch.alpha_parameters()):
        hs = manual_mix(alpha.detach(), [arch.columns[t][i](h) for t, h in enumerate(hs)])
    out = arch(x)
    for t, name in enumerate(tasks):
        assert torch.allclose(out[name], arch.heads[name](hs[t]), atol=1e-6)


def test_identical_columns_are_unchanged_by_the_init_mix():
    # rows of α sum to 1: copies of one network stay that network (LibMTL's all-ones α would scale by T per unit)
    torch.manual_seed(0)
    arch = CrossStitch(["a", "b", "c"], in_channels=2, widths=(3, 4)).eval()
    x = torch.randn(2, 2, 8, 8)
    out = arch(x)
    for t, name in enumerate(arch.task_names):
        assert torch.allclose(
            out[name], arch.heads[name](arch.columns[t][1](arch.columns[t][0](x))), atol=1e-6
        )


def test_alpha_identity_gives_independent_single_task_networks():
    torch.manual_seed(0)
    tasks = ["a", "b"]
    arch = CrossStitch(tasks, [nn.Sequential(nn.Linear(4, 5), nn.Tanh()), lambda: nn.Linear(5, 3)], alpha_self=1.0,
                       heads={"a": nn.Linear(3, 2), "b": nn.Linear(3, 1)})  # fmt: skip
    assert all(torch.equal(a, torch.eye(2)) for a in arch.alpha_parameters())
    x = torch.randn(6, 4)
    out = arch(x)
    for t, name in enumerate(tasks):
        single = nn.Sequential(*arch.columns[t], arch.heads[name])
        assert torch.allclose(out[name], single(x))
        # task t's output reaches no parameter of another column
        other = list(arch.columns[1 - t].parameters())
        grads = torch.autograd.grad(out[name].sum(), other, retain_graph=True, allow_unused=True)
        assert all(g is None or g.abs().sum() == 0 for g in grads)


def test_columns_are_deep_copies_or_fresh_factory_instances():
    stage = nn.Linear(4, 4)
    arch = CrossStitch(["a", "b"], [stage], widths=[4])
    a, b = arch.columns[0][0], arch.columns[1][0]
    assert a is not stage and b is not stage and a is not b
    assert torch.equal(a.weight, stage.weight) and torch.equal(b.weight, stage.weight)
    torch.manual_seed(0)
    fresh = CrossStitch(["a", "b"], [lambda: nn.Linear(4, 4)], widths=[4])
    assert not torch.equal(fresh.columns[0][0].weight, fresh.columns[1][0].weight)


# ------------------------------------------------------------------------------------------ shared set
@pytest.mark.parametrize("per_channel", [False, True])
def test_shared_parameters_are_all_columns_and_alpha(per_channel):
    torch.manual_seed(0)
    arch = CrossStitch(["a", "b", "c"], in_features=5, widths=(4, 3), per_channel=per_channel)
    expected = check_sharing(arch, torch.randn(6, 5))
    assert expected == {id(p) for p in arch.columns.parameters()} | {id(a) for a in arch.alpha_parameters()}
    assert arch.representation_unsupported


def test_param_groups_scale_alpha_lr_without_weight_decay():
    arch = CrossStitch(["a", "b"], in_features=3, widths=(4,))
    groups = arch.param_groups(lr=0.01, alpha_lr_mult=100.0, weight_decay=1e-4)
    assert groups[1]["lr"] == pytest.approx(1.0) and groups[1]["weight_decay"] == 0.0
    assert groups[0]["weight_decay"] == 1e-4 and groups[0]["lr"] == 0.01
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in arch.parameters())
    assert {id(p) for p in groups[1]["params"]} == {id(a) for a in arch.alpha_parameters()}
    with pytest.raises(ValueError, match="alpha_lr_mult"):
        arch.param_groups(lr=0.1, alpha_lr_mult=0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"alpha_self.*\[0, 1\]"):
        CrossStitch(["a", "b"], in_features=3, alpha_self=1.5)
    with pytest.raises(ValueError, match="per_channel.*widths"):
        CrossStitch(
            ["a", "b"], [nn.Linear(3, 3)], {"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)}, per_channel=True
        )
    with pytest.raises(ValueError, match="widths"):
        CrossStitch(["a", "b"], [nn.Linear(3, 3)], widths=[3, 3])
    with pytest.raises(ValueError, match="in_features"):
        CrossStitch(["a", "b"])


def test_seeded_construction_is_reproducible():
    def build():
        torch.manual_seed(5)
        return CrossStitch(["a", "b"], [lambda: nn.Linear(3, 4)], widths=[4], per_channel=True)

    a, b = build().state_dict(), build().state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_training_with_pcgrad_reduces_the_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    ds = TensorDataset(x, torch.tanh(x @ torch.randn(6, 2, generator=g)))
    arch = CrossStitch(["a", "b"], in_features=6, widths=(16, 16))
    module = ArchModule(arch, lr=0.1)
    with torch.no_grad():
        before = sum(v.item() for v in module.task_losses(ds.tensors, 0).values())
    alpha0 = [a.detach().clone() for a in arch.alpha_parameters()]
    trainer(max_epochs=10, callbacks=[PCGrad(seed=0)]).fit(module, DataLoader(ds, batch_size=16))
    with torch.no_grad():
        after = sum(v.item() for v in module.task_losses(ds.tensors, 0).values())
    assert after < 0.8 * before, (before, after)
    assert any(
        not torch.equal(a, b) for a, b in zip(alpha0, arch.alpha_parameters(), strict=True)
    )  # α learns


def test_a_module_holding_it_gets_its_shared_set_and_refuses_representation_mode():
    torch.manual_seed(0)
    arch = CrossStitch(["a", "b"], in_features=3, widths=(4,))
    held = HeldModule(arch)
    assert [id(p) for p in held.shared_parameters()] == [id(p) for p in arch.shared_parameters()]
    with pytest.raises(RuntimeError, match="has none"):
        trainer(max_steps=1, callbacks=[MGDA(mode="representation")]).fit(
            held, DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 2)), batch_size=8)
        )
