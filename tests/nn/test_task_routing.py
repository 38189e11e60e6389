"""TaskRouting (Strezoski, van Noord, Worring, ICCV 2019): fixed seeded per-task masks (buffers, same across
forwards and after save/load, ⌊σC⌋ units kept, different per task), the routed forward against a manual
computation, masked units get no gradient from the task, running a subset of tasks, the shared set by autograd,
bad input, training."""

from __future__ import annotations

import io

import pytest
import torch
from arch_helpers import ArchModule, HeldModule, check_sharing
from helpers import trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.nn.task_routing import TaskRouting
from lightning_mtl.strategies import MGDA, PCGrad

TASKS = [f"t{i}" for i in range(5)]


# ------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize(
    "kwargs, kept",
    [
        ({}, [8, 5]),  # σ = 0.5 kept: ⌊0.5·16⌋, ⌊0.5·10⌋
        ({"sharing_ratio": 0.35}, [5, 3]),  # ⌊5.6⌋, ⌊3.5⌋
        ({"masked_fraction": 0.35}, [11, 7]),  # the official rule: 16 − ⌊5.6⌋, 10 − ⌊3.5⌋
        ({"sharing_ratio": 1.0}, [16, 10]),  # no routing
        ({"masked_fraction": 0.0}, [16, 10]),
    ],
)
def test_each_mask_keeps_the_documented_number_of_units(kwargs, kept):
    arch = TaskRouting(TASKS, in_features=4, widths=(16, 10), **kwargs)
    assert arch.active_units == kept
    for mask, k in zip(arch.masks(), kept, strict=True):
        assert mask.shape[0] == len(TASKS) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (mask.sum(1) == k).all()


def test_masks_are_buffers_fixed_across_forwards_training_and_reload():
    torch.manual_seed(0)
    arch = TaskRouting(TASKS, in_features=4, widths=(16, 16))
    names = {n for n, _ in arch.named_buffers()}
    assert {"mask_0", "mask_1"} <= names and "mask_0" in arch.state_dict()
    assert not any("mask" in n for n, _ in arch.named_parameters())
    before = [m.clone() for m in arch.masks()]
    opt = torch.optim.SGD(arch.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        sum(y.sum() for y in arch(torch.randn(4, 4)).values()).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, arch.masks(), strict=True))
    # a model built with another seed gets the saved masks back from the state_dict
    buffer = io.BytesIO()
    torch.save(arch.state_dict(), buffer)
    buffer.seek(0)
    other = TaskRouting(TASKS, in_features=4, widths=(16, 16), seed=123)
    assert not all(torch.equal(a, b) for a, b in zip(before, other.masks(), strict=True))
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(before, other.masks(), strict=True))
    x = torch.randn(3, 4)
    assert all(torch.equal(arch(x)[t], other(x)[t]) for t in TASKS)


def test_masks_are_seeded_per_layer_and_differ_between_tasks():
    a = TaskRouting(TASKS, in_features=4, widths=(16, 16), seed=1)
    b = TaskRouting(TASKS, in_features=4, widths=(16, 16), seed=1)
    c = TaskRouting(TASKS, in_features=4, widths=(16, 16), seed=2)
    assert all(torch.equal(m, n) for m, n in zip(a.masks(), b.masks(), strict=True))
    assert not torch.equal(a.masks()[0], c.masks()[0])
    for mask in a.masks():
        assert len({tuple(row.tolist()) for row in mask}) == len(TASKS)
    assert not torch.equal(a.masks()[0], a.masks()[1])  # drawn independently per layer


# ------------------------------------------------------------------------------------------ forward
def test_forward_masks_every_stage_output_per_task():
    torch.manual_seed(0)
    arch = TaskRouting(TASKS, in_channels=3, widths=(8, 6)).eval()
    x = torch.randn(2, 3, 8, 8)
    out = arch(x)
    for i, t in enumerate(TASKS):
        h = x
        for stage, mask in zip(arch.stages, arch.masks(), strict=True):
            h = stage(h) * mask[i].view(1, -1, 1, 1)
        assert torch.allclose(out[t], arch.heads[t](h))
        feats = arch.routed_features(x, t)
        off = arch.masks()[-1][i] == 0
        assert (feats[:, off] == 0).all() and feats.shape == (2, 6, 2, 2)


def test_masked_units_get_no_gradient_from_the_task():
    torch.manual_seed(0)
    arch = TaskRouting(TASKS, in_features=4, widths=(12, 10))
    out = arch(torch.randn(5, 4))
    layer0 = arch.stages[0][0]  # Linear 4 → 12 of the first default stage
    for i, t in enumerate(TASKS):
        gw, gb = torch.autograd.grad(out[t].sum(), [layer0.weight, layer0.bias], retain_graph=True)
        off = arch.masks()[0][i] == 0
        assert (gw[off] == 0).all() and (gb[off] == 0).all()
        assert gw[~off].abs().sum() > 0


def test_forward_runs_a_subset_of_tasks():
    torch.manual_seed(0)
    arch = TaskRouting(TASKS, in_features=4, widths=(8,))
    x = torch.randn(3, 4)
    full = arch(x)
    sub = arch(x, tasks=["t3", "t1"])
    assert list(sub) == ["t1", "t3"] and torch.equal(sub["t3"], full["t3"])
    assert list(arch(x, tasks="t2")) == ["t2"]
    with pytest.raises(ValueError, match="unknown tasks"):
        arch(x, tasks=["t9"])


def test_shared_parameters_are_the_stages():
    torch.manual_seed(0)
    arch = TaskRouting(TASKS, in_channels=2, widths=(8, 8))
    expected = check_sharing(arch, torch.randn(3, 2, 8, 8))
    assert expected == {id(p) for p in arch.stages.parameters()}
    assert arch.representation_unsupported


def test_user_stages_need_their_widths():
    stages = [nn.Sequential(nn.Linear(4, 6), nn.ReLU()), lambda: nn.Linear(6, 5)]
    arch = TaskRouting(["a", "b"], stages, widths=[6, 5], out_features={"a": 2, "b": 3})
    assert arch(torch.randn(2, 4))["b"].shape == (2, 3)
    with pytest.raises(ValueError, match="widths"):
        TaskRouting(["a", "b"], stages)
    wrong = TaskRouting(["a", "b"], [nn.Linear(4, 6)], widths=[7])
    with pytest.raises(ValueError, match="7 units"):
        wrong(torch.randn(2, 4))


def test_bad_input():
    with pytest.raises(ValueError, match="not both"):
        TaskRouting(TASKS, in_features=4, sharing_ratio=0.5, masked_fraction=0.5)
    with pytest.raises(ValueError, match=r"sharing_ratio.*\(0, 1\]"):
        TaskRouting(TASKS, in_features=4, sharing_ratio=0.0)
    with pytest.raises(ValueError, match=r"masked_fraction.*\[0, 1\)"):
        TaskRouting(TASKS, in_features=4, masked_fraction=1.0)
    with pytest.raises(ValueError, match="keeps no unit"):
        TaskRouting(TASKS, in_features=4, widths=(3,), sharing_ratio=0.2)
    with pytest.raises(ValueError, match="seed"):
        TaskRouting(TASKS, in_features=4, seed=1.5)


def test_seeded_construction_is_reproducible():
    def build():
        torch.manual_seed(11)
        return TaskRouting(TASKS, in_channels=3, widths=(4,))

    a, b = build().state_dict(), build().state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_training_with_pcgrad_reduces_the_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    ds = TensorDataset(x, torch.tanh(x @ torch.randn(6, 4, generator=g)))
    arch = TaskRouting(["a", "b", "c", "d"], in_features=6, widths=(32, 32))
    module = ArchModule(arch, lr=0.1)
    masks = [m.clone() for m in arch.masks()]
    with torch.no_grad():
        before = sum(v.item() for v in module.task_losses(ds.tensors, 0).values())
    trainer(max_epochs=10, callbacks=[PCGrad(seed=0)]).fit(module, DataLoader(ds, batch_size=16))
    with torch.no_grad():
        after = sum(v.item() for v in module.task_losses(ds.tensors, 0).values())
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(a, b) for a, b in zip(masks, arch.masks(), strict=True))


def test_a_module_holding_it_gets_its_shared_set_and_refuses_representation_mode():
    torch.manual_seed(0)
    arch = TaskRouting(["a", "b"], in_features=3, widths=(4,))
    held = HeldModule(arch)
    assert [id(p) for p in held.shared_parameters()] == [id(p) for p in arch.shared_parameters()]
    with pytest.raises(RuntimeError, match="has none"):
        trainer(max_steps=1, callbacks=[MGDA(mode="representation")]).fit(
            held, DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 2)), batch_size=8)
        )
