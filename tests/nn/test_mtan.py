"""MTAN (Liu, Johns, Davison, CVPR 2019): the attention equations against a manual computation, masks in (0, 1),
task-specific attention reached only by its task, T separate attention modules, the shared set by autograd, user
stages, vector features, bad input, training."""

from __future__ import annotations

import pytest
import torch
from arch_helpers import ArchModule, HeldModule, check_sharing
from helpers import trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.nn.mtan import MTAN
from lightning_mtl.strategies import MGDA


# ------------------------------------------------------------------------------------------ the equations
def test_forward_follows_the_attention_equations():
    torch.manual_seed(0)
    arch = MTAN(["seg", "depth"], in_channels=3, widths=(4, 6), out_features=2).eval()
    x = torch.randn(2, 3, 16, 16)
    out = arch(x)
    u1 = arch.firsts[0](x)
    p1 = arch.lasts[0](u1)
    u2 = arch.firsts[1](p1)
    p2 = arch.lasts[1](u2)
    for t in arch.task_names:
        g1, g2 = arch.attention[t]
        a1_hat = g1(u1) * p1  # â¹ = g¹(u¹) ⊙ p¹
        f1 = F.max_pool2d(arch.blocks[0](a1_hat), 2)  # f¹ then 2× max-pool to u²'s resolution
        a2_hat = g2(torch.cat([u2, f1], 1)) * p2  # â² = g²([u² ; f¹(â¹)]) ⊙ p²
        assert torch.allclose(out[t], arch.heads[t](a2_hat), atol=1e-6)
    assert out["seg"].shape == (2, 2)


def test_masks_are_in_the_open_unit_interval_and_shaped_like_p():
    torch.manual_seed(0)
    arch = MTAN(["a", "b", "c"], in_channels=3, widths=(4, 8))
    x = torch.randn(4, 3, 16, 16)
    masks = arch.attention_masks(x)
    assert list(masks) == ["a", "b", "c"]
    shapes = [(4, 4, 8, 8), (4, 8, 4, 4)]
    for per_stage in masks.values():
        assert [tuple(m.shape) for m in per_stage] == shapes
        assert all(((m > 0) & (m < 1)).all() for m in per_stage)


def test_attention_modules_are_separate_per_task_and_reached_only_by_their_task():
    torch.manual_seed(0)
    arch = MTAN(["a", "b", "c"], in_channels=3, widths=(4, 8))
    for j in range(2):
        mods = [arch.attention[t][j] for t in arch.task_names]
        assert len({id(m) for m in mods}) == 3  # not LibMTL's [module] * T
        assert not torch.equal(mods[0][0].weight, mods[1][0].weight)
    out = arch(torch.randn(2, 3, 16, 16))
    for t in arch.task_names:
        for other in arch.task_names:
            params = list(arch.attention[other].parameters())
            grads = torch.autograd.grad(out[t].sum(), params, retain_graph=True, allow_unused=True)
            if other == t:
                assert all(g is not None and g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None for g in grads)


@pytest.mark.parametrize("image", [True, False])
def test_shared_parameters_are_the_backbone_and_f_blocks(image):
    torch.manual_seed(0)
    if image:
        arch, x = MTAN(["a", "b", "c"], in_channels=2, widths=(3, 4, 5)), torch.randn(3, 2, 16, 16)
    else:
        arch, x = MTAN(["a", "b", "c"], in_features=5, widths=(4, 3)), torch.randn(6, 5)
    expected = check_sharing(arch, x)
    backbone = [arch.firsts, arch.lasts, arch.blocks]
    assert expected == {id(p) for m in backbone for p in m.parameters()}
    assert arch.representation_unsupported


def test_vector_features_use_linear_attention():
    arch = MTAN(["a", "b"], in_features=5, widths=(4, 6))
    assert not arch.spatial and isinstance(arch.attention["a"][1][0], nn.Linear)
    assert arch.attention["a"][1][0].in_features == 12  # [u² ; f¹(â¹)]
    masks = arch.attention_masks(torch.randn(3, 5))
    assert [tuple(m.shape) for m in masks["b"]] == [(3, 4), (3, 6)]
    user = MTAN(["a", "b"], [(nn.Linear(5, 4), nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3))],
                widths=[4, 3], spatial=False)  # fmt: skip
    assert user(torch.randn(3, 5))["a"].shape == (3, 1) and isinstance(user.blocks[0][0], nn.Linear)


def test_user_stages_as_sequentials_or_pairs():
    def block(i, o, stride=1):
        return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.BatchNorm2d(o), nn.ReLU())

    stages = [nn.Sequential(block(3, 4, 2), block(4, 4)), (lambda: block(4, 8, 2), block(8, 6))]
    arch = MTAN(["a", "b"], stages, widths=[4, (8, 6)])
    assert arch.attention["a"][1][0].in_channels == 16 and arch.attention["a"][1][3].out_channels == 6
    out = arch(torch.randn(2, 3, 16, 16))
    assert out["a"].shape == (2, 1)
    heads = {"a": nn.Conv2d(6, 1, 1), "b": nn.Conv2d(6, 2, 1)}  # dense heads
    dense = MTAN(["a", "b"], [nn.Sequential(block(3, 6), block(6, 6))], heads, widths=[6])
    assert dense(torch.randn(2, 3, 8, 8))["b"].shape == (2, 2, 8, 8)


def test_bad_input():
    with pytest.raises(ValueError, match="in_channels"):
        MTAN(["a", "b"])
    with pytest.raises(ValueError, match="widths"):
        MTAN(["a", "b"], [nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1))])
    with pytest.raises(ValueError, match=r"stages\[0\].*two or more"):
        MTAN(["a", "b"], [nn.Sequential(nn.Conv2d(3, 4, 1))], widths=[4])
    with pytest.raises(ValueError, match=r"stages\[0\]"):
        MTAN(["a", "b"], [nn.Conv2d(3, 4, 1)], widths=[4])
    with pytest.raises(ValueError, match=r"widths\[0\]"):
        MTAN(["a", "b"], [nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1))], widths=[(4, 0)])


def test_seeded_construction_is_reproducible():
    def build():
        torch.manual_seed(7)
        return MTAN(["a", "b"], in_channels=3, widths=(4,))

    a, b = build().state_dict(), build().state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_training_with_mgda_reduces_the_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=g)
    ds = TensorDataset(x, x.mean((2, 3)) @ torch.randn(3, 2, generator=g))
    module = ArchModule(MTAN(["a", "b"], in_channels=3, widths=(4, 4)), lr=0.1)
    with torch.no_grad():
        before = sum(v.item() for v in module.task_losses(ds.tensors, 0).values())
    trainer(max_epochs=6, callbacks=[MGDA()]).fit(module, DataLoader(ds, batch_size=16))
    with torch.no_grad():
        after = sum(v.item() for v in module.task_losses(ds.tensors, 0).values())
    assert after < 0.8 * before, (before, after)


def test_a_module_holding_it_gets_its_shared_set_and_refuses_representation_mode():
    torch.manual_seed(0)
    arch = MTAN(["a", "b"], in_channels=3, widths=(4,))
    held = HeldModule(arch)
    assert [id(p) for p in held.shared_parameters()] == [id(p) for p in arch.shared_parameters()]
    with pytest.raises(RuntimeError, match="has none"):
        trainer(max_steps=1, callbacks=[MGDA(mode="representation")]).fit(
            held, DataLoader(TensorDataset(torch.randn(8, 3, 8, 8), torch.randn(8, 2)), batch_size=8)
        )
