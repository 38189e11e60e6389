"""Every architecture of ``lightning_mtl.nn`` in a ``MultiTaskModule``: the shared set it declares is the one the
first step's graph shows, the example trains any of them with any strategy, and ``compare --arch`` runs them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_data, trainer
from torch import nn

from lightning_mtl import MultiTaskModule
from lightning_mtl.datasets import ArchitectureMultiTask, BuiltinDataModule
from lightning_mtl.gradients.sharing import find_sharing
from lightning_mtl.nn import ARCHITECTURES, build_architecture, resolve_architecture
from lightning_mtl.strategies import PCGrad

ROOT = Path(__file__).resolve().parents[2]


class Holder(MultiTaskModule):
    """A module that holds an architecture and writes no shared_parameters()."""

    def __init__(self, arch: str, tasks=("a", "b", "c")):
        super().__init__(tasks=tasks)
        torch.manual_seed(0)
        self.model = build_architecture(arch, self.task_names, 6, {t: 1 for t in self.task_names}, hidden=8)

    def task_losses(self, batch, batch_idx):
        x, y = batch
        out = self.model(x)
        losses = {
            t: nn.functional.mse_loss(out[t].squeeze(1), y[:, i]) for i, t in enumerate(self.task_names)
        }
        for t, term in getattr(self.model, "aux_losses", {}).items():
            losses[t] = losses[t] + term
        return losses

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_declared_shared_set_is_what_the_graph_shows(arch):
    net = Holder(arch)
    assert net.architecture is net.model and not net.finds_shared_parameters
    losses = net.task_losses(make_data(n=8).tensors, 0)
    found = find_sharing(net, losses)
    declared = list(net.shared_parameters())
    assert [id(p) for p in found.shared_parameters] == [id(p) for p in declared] or {
        id(p) for p in found.shared_parameters
    } == {id(p) for p in declared}
    assert declared, f"{arch} shares nothing"
    assert not found.unreached


@pytest.mark.parametrize("arch", ["HardSharing", "MMoE", "TaskRouting"])
def test_a_gradient_strategy_trains_every_kind(arch):
    net = Holder(arch)
    before = [p.detach().clone() for p in net.shared_parameters()]
    trainer(max_epochs=1, callbacks=[PCGrad()]).fit(
        net, torch.utils.data.DataLoader(make_data(n=32), batch_size=8)
    )
    assert any(not torch.equal(b, p) for b, p in zip(before, net.shared_parameters()))


def test_names_resolve_case_and_dash_insensitively():
    assert resolve_architecture("hard-sharing") == "HardSharing"
    assert resolve_architecture("mmoe") == "MMoE"
    with pytest.raises(ValueError, match="Unknown architecture 'resnet'; available: HardSharing"):
        resolve_architecture("resnet")
    with pytest.raises(ValueError, match="hidden must be an int >= 2"):
        build_architecture("MMoE", ["a"], 4, {"a": 1}, hidden=1)


def test_builtin_architecture_model_learns_digits():
    model = ArchitectureMultiTask("digits", "cgc", tasks=["digit", "parity"], hidden=16)
    t = trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=2, callbacks=[PCGrad()])
    t.fit(model, datamodule=BuiltinDataModule("digits", batch_size=32))
    assert torch.isfinite(t.callback_metrics["val/loss"])


def _load_example():
    path = ROOT / "examples" / "architectures.py"
    spec = importlib.util.spec_from_file_location("example_architectures", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_example_runs_any_architecture_with_any_strategy(capsys):
    example = _load_example()
    losses = example.main(
        ["--arch", "dselectk", "--strategy", "mgda", "--epochs", "1", "--batch-size", "256"]
    )
    assert set(losses) >= {"val/loss/digit", "val/loss/parity", "val/loss/value"}
    assert "DSelectK + MGDA" in capsys.readouterr().out
    assert "def shared_parameters" not in (ROOT / "examples" / "architectures.py").read_text()


def test_compare_runs_architectures_times_strategies(tmp_path):
    from lightning_mtl.cli import main

    out = tmp_path / "cmp"
    main(
        [
            "compare", "--arch", "HardSharing,PLE", "--strategies", "equal,mgda", "--epochs", "1",
            "--baselines", "none", "--out", str(out), "--quiet", "--batch-size", "256",
        ]
    )  # fmt: skip
    table = (out / "results.md").read_text()
    for run in ("HardSharing/EqualWeighting", "HardSharing/MGDA", "PLE/EqualWeighting", "PLE/MGDA"):
        assert run in table
    assert "architectures HardSharing, PLE" in table
