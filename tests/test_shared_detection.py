"""Shared parameters found automatically from the first training step's graph, and the architecture contract
(:class:`~lightning_mtl.nn.MultiTaskArchitecture`): a held architecture gives ``shared_parameters()`` and marks
the shared representation."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import TinyNet, ddp_parity_records, flat_params, loader, make_data, trainer
from torch import nn

from lightning_mtl import MultiTaskModule
from lightning_mtl.callbacks import GradientConflictMonitor
from lightning_mtl.gradients.sharing import find_sharing, reached_leaves
from lightning_mtl.nn.base import MultiTaskArchitecture
from lightning_mtl.strategies import MGDA, EqualWeighting, GradNorm, PCGrad, UPGrad


class AutoTinyNet(TinyNet):
    """TinyNet without ``shared_parameters()``: the module finds them."""

    shared_parameters = MultiTaskModule.shared_parameters


class PartlySharedNet(MultiTaskModule):
    """encoder → a, b, c; ``ab`` feeds tasks a and b only; ``unused`` feeds nothing."""

    def __init__(self, **kwargs):
        super().__init__(tasks=("a", "b", "c"), **kwargs)
        torch.manual_seed(0)
        self.encoder = nn.Linear(6, 8)
        self.ab = nn.Linear(8, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in "abc"})
        self.unused = nn.Linear(3, 3)

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = torch.tanh(self.encoder(x))
        w = torch.tanh(self.ab(z))
        return {
            "a": nn.functional.mse_loss(self.heads["a"](w).squeeze(1), y[:, 0]),
            "b": nn.functional.mse_loss(self.heads["b"](w).squeeze(1), y[:, 1]),
            "c": nn.functional.mse_loss(self.heads["c"](z).squeeze(1), y[:, 2]),
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _names(module, params):
    by_id = {id(p): n for n, p in module.named_parameters()}
    return [by_id[id(p)] for p in params]


# ------------------------------------------------------------------------------------------ the graph walk
def test_find_sharing_reads_the_graph_without_a_backward():
    net = PartlySharedNet()
    x, y = make_data(n=4).tensors
    losses = net.task_losses((x, y), 0)
    sharing = find_sharing(net, losses)
    assert [n for n, _ in sharing.shared] == ["encoder.weight", "encoder.bias", "ab.weight", "ab.bias"]
    assert sharing.task_specific == {
        "a": ["heads.a.weight", "heads.a.bias"],
        "b": ["heads.b.weight", "heads.b.bias"],
        "c": ["heads.c.weight", "heads.c.bias"],
    }
    assert sharing.unreached == ["unused.weight", "unused.bias"]
    assert sharing.top_level_modules() == ["encoder", "ab"]
    assert sharing.shared_elements == 6 * 8 + 8 + 8 * 8 + 8
    assert all(p.grad is None for p in net.parameters())  # nothing was back-propagated
    assert reached_leaves(torch.tensor(1.0)) == set()


def test_frozen_parameters_are_neither_shared_nor_unreached():
    net = PartlySharedNet()
    net.ab.requires_grad_(False)
    sharing = find_sharing(net, net.task_losses(make_data(n=4).tensors, 0))
    assert [n for n, _ in sharing.shared] == ["encoder.weight", "encoder.bias"]
    assert "ab.weight" not in sharing.unreached


# ------------------------------------------------------------------------------------------ in a fit
def test_a_module_without_shared_parameters_finds_them_and_trains_like_the_declared_one(caplog):
    reference = TinyNet()
    trainer(max_epochs=2, callbacks=[PCGrad()]).fit(reference, loader(make_data()))
    auto = AutoTinyNet()
    assert (
        auto.finds_shared_parameters and auto.shared_parameters() is None
    )  # not known before the first step
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):  # other tests may have quietened it
        trainer(max_epochs=2, callbacks=[PCGrad()]).fit(auto, loader(make_data()))
    assert _names(auto, auto.shared_parameters()) == ["encoder.0.weight", "encoder.0.bias"]
    torch.testing.assert_close(flat_params(auto), flat_params(reference), atol=0, rtol=0)
    found = [r.getMessage() for r in caplog.records if "shared parameters found" in r.getMessage()]
    assert len(found) == 1  # logged once per fit
    assert "2 parameter tensor(s), 56 element(s)" in found[0] and "in encoder" in found[0]


def test_subset_sharing_and_unreached_parameters_warn_once():
    net = PartlySharedNet()
    with pytest.warns(
        RuntimeWarning, match=r"2 trainable parameter tensor\(s\) are reached by no task.*'unused.weight'"
    ):
        trainer(max_epochs=1, callbacks=[MGDA()]).fit(net, loader(make_data()))
    assert _names(net, net.shared_parameters()) == ["encoder.weight", "encoder.bias", "ab.weight", "ab.bias"]


def test_an_override_keeps_its_own_answer():
    net = TinyNet()
    assert not net.finds_shared_parameters
    trainer(max_steps=2, callbacks=[PCGrad()]).fit(net, loader(make_data()))
    assert net._sharing is None  # no detection ran
    assert _names(net, net.shared_parameters()) == ["encoder.0.weight", "encoder.0.bias"]


@pytest.mark.parametrize("make", [lambda: GradNorm(), lambda: EqualWeighting()])
def test_gradnorm_and_diagnostics_wait_for_the_first_step(make):
    auto, reference = AutoTinyNet(), TinyNet()
    for net in (auto, reference):
        trainer(max_epochs=1, callbacks=[make(), GradientConflictMonitor(every_n_steps=2)]).fit(
            net, loader(make_data())
        )
    torch.testing.assert_close(flat_params(auto), flat_params(reference), atol=0, rtol=0)


def test_a_new_fit_finds_them_again():
    net = PartlySharedNet()
    trainer(max_steps=1, callbacks=[UPGrad()]).fit(net, loader(make_data()))
    net.ab.requires_grad_(False)  # the model changed between fits
    trainer(max_steps=1, callbacks=[UPGrad()]).fit(net, loader(make_data()))
    assert _names(net, net.shared_parameters()) == ["encoder.weight", "encoder.bias"]


@pytest.mark.timeout(240)
def test_found_parameters_are_exact_under_ddp(tmp_path):
    single, rank0, rank1 = ddp_parity_records(tmp_path, PCGrad, epochs=2, model=AutoTinyNet, tag="auto")
    torch.testing.assert_close(rank0["params"], rank1["params"], atol=0, rtol=0)
    torch.testing.assert_close(single["params"], rank0["params"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ architectures
class TwoHeads(MultiTaskArchitecture):
    """A trunk and one head per task; the trunk output is the marked representation."""

    def __init__(self, tasks=("a", "b", "c")):
        super().__init__(tasks)
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in self.task_names})

    def shared_modules(self):
        return [self.trunk]

    def forward(self, x):
        z = self.mark(self.trunk(x))
        return {t: self.heads[t](z).squeeze(1) for t in self.task_names}


class Columns(TwoHeads):
    representation_unsupported = "each task reads its own column."

    def forward(self, x):
        return {t: self.heads[t](self.trunk(x)).squeeze(1) for t in self.task_names}


class ArchNet(MultiTaskModule):
    def __init__(self, arch_cls=TwoHeads):
        super().__init__(tasks=("a", "b", "c"))
        self.model = arch_cls()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        out = self.model(x)
        return {t: nn.functional.mse_loss(out[t], y[:, i]) for i, t in enumerate(self.task_names)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_held_architecture_gives_the_shared_parameters_and_marks_the_representation():
    net = ArchNet()
    assert net.architecture is net.model and not net.finds_shared_parameters
    assert _names(net, net.shared_parameters()) == ["model.trunk.0.weight", "model.trunk.0.bias"]
    # the declared set is what the graph shows
    sharing = find_sharing(net, net.task_losses(make_data(n=4).tensors, 0))
    assert [p for _, p in sharing.shared] == list(net.shared_parameters())
    trainer(max_epochs=1, callbacks=[MGDA(mode="representation")]).fit(net, loader(make_data()))
    assert net.model._marker is None  # installed for the training forward only
    x = make_data(n=4).tensors[0]
    assert set(net.model(x)) == {"a", "b", "c"}  # outside training: no marker, plain outputs


def test_an_architecture_without_one_representation_refuses_representation_mode_clearly():
    with pytest.raises(
        RuntimeError,
        match=r"MGDA needs one shared representation.*Columns has none: each task reads its own column\. Its shared parameters are known: use mode='parameters'",
    ):
        trainer(max_steps=1, callbacks=[MGDA(mode="representation")]).fit(
            ArchNet(Columns), loader(make_data())
        )
    trainer(max_steps=2, callbacks=[MGDA()]).fit(ArchNet(Columns), loader(make_data()))


def test_resume_with_found_parameters_matches_uninterrupted(tmp_path):
    # the set is found again on the resumed fit's first step: GradVac's state (targets) and the update continue
    from lightning_mtl.strategies import GradVac

    data = loader(make_data(n=48), batch_size=12)

    class AutoAdam(AutoTinyNet):
        def __init__(self):
            super().__init__(optimizer="adam", lr=0.01)

    straight = AutoAdam()
    trainer(max_epochs=4, callbacks=[GradVac(seed=3)]).fit(straight, data)
    first = AutoAdam()
    t1 = trainer(max_epochs=2, callbacks=[GradVac(seed=3)])
    t1.fit(first, data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed = AutoAdam()
    trainer(max_epochs=4, callbacks=[GradVac(seed=3)]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    assert _names(resumed, resumed.shared_parameters()) == ["encoder.0.weight", "encoder.0.bias"]
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
