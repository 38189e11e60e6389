"""HardSharing (Caruana 1997; Søgaard & Goldberg, ACL 2016) and MultiBackbone (MBMT-Net, IEEE Access 2022):
shapes, branching at lower layers, the shared set by autograd, the marked representation, bad input, training."""

from __future__ import annotations

import pytest
import torch
from arch_helpers import ArchModule, HeldModule, check_sharing
from helpers import trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.nn.hard_sharing import HardSharing, MultiBackbone
from lightning_mtl.strategies import MGDA, PCGrad

# ------------------------------------------------------------------------------------------ helpers


def vector_data(n: int = 64, d: int = 6, tasks: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, torch.tanh(x @ torch.randn(d, tasks, generator=g)))


def total_loss(module: HeldModule, ds: TensorDataset) -> float:
    with torch.no_grad():
        return sum(v.item() for v in module.task_losses(ds.tensors, 0).values())


def fit_reduces_loss(arch, ds: TensorDataset, strategy, epochs: int = 15, held: bool = False, **kw) -> None:
    module = (HeldModule if held else ArchModule)(arch, **kw)
    before = total_loss(module, ds)
    trainer(max_epochs=epochs, callbacks=[strategy]).fit(module, DataLoader(ds, batch_size=16))
    after = total_loss(module, ds)
    assert after < 0.7 * before, (before, after)


# ------------------------------------------------------------------------------------------ HardSharing
def test_shapes_default_mlp_and_conv():
    arch = HardSharing(["a", "b"], in_features=6, widths=(8, 4), out_features={"a": 3, "b": 1})
    out = arch(torch.randn(5, 6))
    assert list(out) == ["a", "b"] and out["a"].shape == (5, 3) and out["b"].shape == (5, 1)
    conv = HardSharing(["a", "b"], in_channels=3, widths=(4, 8), branch_at={"a": 1}, out_features=2)
    out = conv(torch.randn(2, 3, 8, 8))
    assert out["a"].shape == (2, 2) and out["b"].shape == (2, 2)
    assert conv.heads["a"].linear.in_features == 4 and conv.heads["b"].linear.in_features == 8


@pytest.mark.parametrize(
    "branch_at, shared_depth",
    [
        (None, 3),
        ({"a": 1}, 3),
        ({"a": 1, "b": 2}, 2),
        ({"a": 2, "b": 2}, 2),
        ({"b": 2}, 3),
        ({"a": 1, "b": 1}, 1),
    ],
)
def test_shared_parameters_are_those_two_tasks_reach(branch_at, shared_depth):
    torch.manual_seed(0)
    arch = HardSharing(["a", "b", "c"], in_features=5, widths=(6, 6, 6), branch_at=branch_at)
    assert arch.shared_depth == shared_depth
    expected = check_sharing(arch, torch.randn(7, 5))
    assert expected == {id(p) for p in arch.stages[:shared_depth].parameters()}


def test_one_task_shares_nothing_and_conv_trunk_sharing():
    arch = HardSharing(["only"], in_features=4, widths=(3,))
    assert list(arch.shared_parameters()) == [] and len(list(arch.task_parameters())) == 4
    torch.manual_seed(0)
    conv = HardSharing(["a", "b", "c"], in_channels=2, widths=(3, 4), branch_at={"c": 1})
    check_sharing(conv, torch.randn(4, 2, 8, 8))


def test_a_task_branching_low_gets_no_gradient_above_its_layer():
    torch.manual_seed(0)
    arch = HardSharing(["pos", "ccg"], in_features=5, widths=(6, 6, 6), branch_at={"pos": 1})
    out = arch(torch.randn(4, 5))
    upper = list(arch.stages[1:].parameters())
    grads = torch.autograd.grad(
        out["pos"].sum(), upper + list(arch.stages[0].parameters()), allow_unused=True
    )
    assert all(g is None for g in grads[: len(upper)])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[len(upper) :])


def test_the_marked_representation_is_the_lowest_branch_point_and_every_task_reads_it():
    torch.manual_seed(0)
    arch = HardSharing(["a", "b", "c"], in_features=5, widths=(6, 7, 8), branch_at={"a": 2, "b": 3, "c": 3})
    seen = []
    arch.set_representation_marker(lambda z: seen.append(z) or z.detach())
    out = arch(torch.randn(4, 5))
    assert len(seen) == 1 and seen[0].shape == (4, 7)  # the output of stage 2, marked once
    # a detaching marker cuts every task from the stages up to the mark: they all read the marked tensor
    low = list(arch.stages[:2].parameters())
    for y in out.values():
        assert all(g is None for g in torch.autograd.grad(y.sum(), low, allow_unused=True))


def test_user_stages_heads_and_factories():
    stages = [nn.Sequential(nn.Linear(4, 5), nn.Tanh()), lambda: nn.Linear(5, 3)]
    heads = {"a": nn.Linear(5, 2), "b": lambda: nn.Linear(3, 1)}
    arch = HardSharing(["a", "b"], stages, heads, branch_at={"a": 1})
    out = arch(torch.randn(2, 4))
    assert out["a"].shape == (2, 2) and out["b"].shape == (2, 1)
    as_module_dict = HardSharing(
        ["a", "b"], [nn.Linear(4, 5)], nn.ModuleDict({"a": nn.Linear(5, 2), "b": nn.Linear(5, 1)})
    )
    assert as_module_dict(torch.randn(2, 4))["a"].shape == (2, 2)
    by_name = HardSharing(["a", "b"], [nn.Linear(4, 5)], lambda t: nn.Linear(5, 2 if t == "a" else 1))
    assert by_name(torch.randn(2, 4))["a"].shape == (2, 2)
    declared = HardSharing(["a", "b"], [nn.Linear(4, 5), nn.Linear(5, 3)], widths=[5, 3], branch_at={"a": 1})
    assert declared.heads["a"].linear.in_features == 5 and declared.heads["b"].linear.in_features == 3
    sequential = HardSharing(
        ["a", "b"], nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), widths=[5, 5, 3]
    )
    assert len(sequential.stages) == 3 and sequential(torch.randn(2, 4))["b"].shape == (2, 1)


def test_bad_input_names_argument_and_fix():
    with pytest.raises(ValueError, match="in_features"):
        HardSharing(["a"])
    with pytest.raises(ValueError, match="in_features"):
        HardSharing(["a"], in_features=3, in_channels=3)
    with pytest.raises(ValueError, match=r"branch_at\['a'\].*1\.\.2"):
        HardSharing(["a", "b"], in_features=3, widths=(4, 4), branch_at={"a": 3})
    with pytest.raises(ValueError, match="unknown tasks"):
        HardSharing(["a", "b"], in_features=3, branch_at={"z": 1})
    with pytest.raises(ValueError, match="unused"):
        HardSharing(["a", "b"], in_features=3, widths=(4, 4), branch_at={"a": 1, "b": 1})
    with pytest.raises(ValueError, match="heads="):
        HardSharing(["a", "b"], [nn.Linear(3, 4)])
    with pytest.raises(ValueError, match="missing"):
        HardSharing(["a", "b"], [nn.Linear(3, 4)], {"a": nn.Linear(4, 1)})
    shared_head = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="same module"):
        HardSharing(["a", "b"], [nn.Linear(3, 4)], {"a": shared_head, "b": shared_head})
    with pytest.raises(ValueError, match="widths"):
        HardSharing(["a"], in_features=3, widths=(4, 0))
    with pytest.raises(ValueError, match="single Linear"):
        HardSharing(["a"], nn.Linear(3, 4))
    with pytest.raises(ValueError, match="factory"):
        HardSharing(["a"], [nn.Linear(3, 4), "relu"])
    with pytest.raises(ValueError, match="out_features"):
        HardSharing(["a"], in_features=3, out_features=0)
    with pytest.raises(ValueError, match="tasks"):
        HardSharing([], in_features=3)


def test_seeded_construction_is_reproducible():
    def build():
        torch.manual_seed(3)
        return HardSharing(["a", "b"], in_channels=3, widths=(4,), branch_at={"a": 1})

    a, b = build(), build()
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_training_with_pcgrad_reduces_the_loss():
    torch.manual_seed(0)
    arch = HardSharing(["a", "b", "c"], in_features=6, widths=(16, 16), branch_at={"a": 1})
    fit_reduces_loss(arch, vector_data(), PCGrad(seed=0))


def test_a_module_holding_it_gets_its_shared_set_and_trains_in_representation_mode():
    torch.manual_seed(0)
    arch = HardSharing(["a", "b", "c"], in_features=6, widths=(16, 16), branch_at={"a": 1})
    held = HeldModule(arch)
    assert [id(p) for p in held.shared_parameters()] == [id(p) for p in arch.shared_parameters()]
    fit_reduces_loss(arch, vector_data(), MGDA(mode="representation"), held=True)


# ------------------------------------------------------------------------------------------ MultiBackbone
def test_multibackbone_concatenates_and_marks_once():
    torch.manual_seed(0)
    arch = MultiBackbone(["a", "b"], in_features=5, widths=(6, 4), num_backbones=3, out_features=2)
    seen = []
    arch.set_representation_marker(lambda z: seen.append(z) or z)
    x = torch.randn(3, 5)
    out = arch(x)
    assert out["a"].shape == (3, 2) and len(seen) == 1
    assert torch.equal(seen[0], torch.cat([b(x) for b in arch.backbones], 1)) and seen[0].shape == (3, 12)
    assert torch.equal(out["b"], arch.heads["b"](seen[0]))
    # the default backbones are initialised independently
    assert not torch.equal(arch.backbones[0][0][0].weight, arch.backbones[1][0][0].weight)


def test_multibackbone_shared_set_by_autograd():
    torch.manual_seed(0)
    arch = MultiBackbone(["a", "b", "c"], in_channels=2, widths=(3,))
    expected = check_sharing(arch, torch.randn(4, 2, 8, 8))
    assert expected == {id(p) for p in arch.backbones.parameters()}


@pytest.mark.parametrize("resize, size", [("smallest", (4, 4)), ("largest", (8, 8))])
def test_multibackbone_resizes_maps_of_different_sizes(resize, size):
    backbones = [nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(3, 5, 3, padding=1)]
    arch = MultiBackbone(["a", "b"], backbones, feature_widths=[4, 5], resize=resize)
    x = torch.randn(2, 3, 8, 8)
    z = arch.features(x)
    assert z.shape == (2, 9, *size)
    if resize == "smallest":
        assert torch.allclose(z[:, :4], backbones[0](x)) and torch.allclose(
            z[:, 4:], F.avg_pool2d(backbones[1](x), 2)
        )
    assert arch(x)["a"].shape == (2, 1)


def test_multibackbone_bad_input():
    with pytest.raises(ValueError, match="resize"):
        MultiBackbone(["a"], in_features=3, resize="mean")
    with pytest.raises(ValueError, match="num_backbones"):
        MultiBackbone(["a"], in_features=3, num_backbones=0)
    with pytest.raises(ValueError, match="feature_widths"):
        MultiBackbone(["a"], [nn.Linear(3, 4)], feature_widths=[4, 4])
    bb = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="same module"):
        MultiBackbone(["a"], [bb, bb], feature_widths=[4, 4])
    mixed = MultiBackbone(
        ["a"], [nn.Conv2d(3, 2, 1), nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten())], {"a": nn.Identity()}
    )
    with pytest.raises(ValueError, match="ranks"):
        mixed(torch.randn(1, 3, 2, 2))


def test_multibackbone_held_trains_in_representation_mode():
    # the module takes the concatenated features as the shared representation (MGDA on ∂L_t/∂z)
    torch.manual_seed(0)
    arch = MultiBackbone(["a", "b", "c"], in_features=6, widths=(16,))
    fit_reduces_loss(arch, vector_data(), MGDA(mode="representation"), held=True)
