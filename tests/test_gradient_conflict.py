"""Gradient-conflict monitor: cosines on constructed gradients, schedule, logging, no effect on training."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyNet, flat_params, loader, make_data, trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import nn

from lightning_mtl import MultiTaskModule
from lightning_mtl.callbacks import GradientConflictMonitor, conflict_statistics
from lightning_mtl.strategies import UncertaintyWeighting


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))


class LinearLosses(MultiTaskModule):
    """Shared w in R^2; L_a = w.u, L_b = w.v, L_c = w.(-u): task gradients u, v, -u whatever w is."""

    U, V = (1.0, 0.0), (-1.0, 1.0)

    def __init__(self):
        super().__init__(tasks=["a", "b", "c"])
        self.w = nn.Parameter(torch.tensor([0.3, -0.2]))
        self.register_buffer("u", torch.tensor(self.U))
        self.register_buffer("v", torch.tensor(self.V))

    def shared_parameters(self):
        return [self.w]

    def task_losses(self, batch, batch_idx):
        scale = batch[0].mean() * 0 + 1  # depends on the batch only through a constant
        return {
            "a": scale * (self.w @ self.u),
            "b": scale * (self.w @ self.v),
            "c": -scale * (self.w @ self.u),
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_conflict_statistics_constructed_case():
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])
    cos, norms, fraction = conflict_statistics(J)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[1, 0, -1, s], [0, 1, 0, s], [-1, 0, 1, -s], [s, s, -s, 1]], dtype=torch.float32)
    torch.testing.assert_close(cos, expected)
    torch.testing.assert_close(norms, torch.tensor([1.0, 2.0, 3.0, math.sqrt(2)]))
    assert float(fraction) == pytest.approx(2 / 6)  # pairs (0,2) and (2,3) conflict
    cos, norms, fraction = conflict_statistics(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    assert (
        cos[0, 1] == 0 and cos[0, 0] == 1 and float(fraction) == 0
    )  # a zero gradient conflicts with nothing
    assert float(conflict_statistics(torch.ones(1, 3))[2]) == 0  # one task: no pair


def test_monitor_logs_cosines_of_the_step_gradients():
    log = MemoryLogger()
    monitor = GradientConflictMonitor(every_n_steps=3)
    t = trainer(max_epochs=1, callbacks=[monitor], logger=log, log_every_n_steps=1000)
    t.fit(LinearLosses(), loader(make_data(n=7 * 4), batch_size=4))  # 7 steps: measured at 0, 3, 6
    measured = [(step, m) for step, m in log.logged if "grad/conflict_fraction" in m]
    assert [step for step, _ in measured] == [0, 3, 6]  # off the Trainer's log_every_n_steps schedule
    s = 1 / math.sqrt(2)
    for _, m in measured:
        assert m["grad/cos/a/b"] == pytest.approx(-s, abs=1e-6)
        assert m["grad/cos/a/c"] == pytest.approx(-1.0, abs=1e-6)
        assert m["grad/cos/b/c"] == pytest.approx(s, abs=1e-6)
        assert m["grad/norm/a"] == pytest.approx(1.0) and m["grad/norm/b"] == pytest.approx(math.sqrt(2))
        assert m["grad/conflict_fraction"] == pytest.approx(2 / 3)
    assert monitor.mean_conflict_fraction == pytest.approx(2 / 3)
    torch.testing.assert_close(monitor.mean_cosine[0, 2], torch.tensor(-1.0))
    assert monitor.last["step"] == 6


def test_monitor_does_not_change_training():
    ds = make_data(n=48)
    plain = TinyNet(optimizer="adam")
    trainer(max_epochs=2, callbacks=[UncertaintyWeighting()]).fit(plain, loader(ds))
    watched = TinyNet(optimizer="adam")
    monitor = GradientConflictMonitor(every_n_steps=1)
    trainer(max_epochs=2, callbacks=[UncertaintyWeighting(), monitor]).fit(watched, loader(ds))
    assert torch.equal(flat_params(plain), flat_params(watched))
    assert monitor._count == 6


def test_heatmap_reaches_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="run", version="")
    t = trainer(max_epochs=2, callbacks=[GradientConflictMonitor(every_n_steps=2)], logger=logger)
    t.fit(TinyNet(), loader(make_data(n=32)))
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    assert "grad/cosine_heatmap" in events.Tags()["images"]
    assert len(events.Images("grad/cosine_heatmap")) == 2  # one per epoch
    assert "grad/cos/a/b" in events.Tags()["scalars"]


def test_requires_shared_parameters_and_valid_arguments():
    class NoShared(TinyNet):
        def shared_parameters(self):
            return None

    with pytest.raises(
        ValueError, match=r"GradientConflictMonitor needs the shared parameters.*shared_parameters\(\)"
    ):
        trainer(callbacks=[GradientConflictMonitor()]).fit(NoShared(), loader(make_data(n=16)))
    with pytest.raises(ValueError, match="every_n_steps must be an int >= 1, got 0"):
        GradientConflictMonitor(every_n_steps=0)


def test_state_round_trips():
    monitor = GradientConflictMonitor(every_n_steps=1)
    trainer(callbacks=[monitor]).fit(TinyNet(), loader(make_data(n=32)))
    fresh = GradientConflictMonitor(every_n_steps=1)
    fresh.load_state_dict(monitor.state_dict())
    torch.testing.assert_close(fresh.mean_cosine, monitor.mean_cosine)
    assert fresh.mean_conflict_fraction == monitor.mean_conflict_fraction
    assert isinstance(monitor, pl.Callback)


def test_heatmap_image_fallback_colours():
    from lightning_mtl.callbacks._report import heatmap_image

    img = heatmap_image(torch.tensor([[1.0, -1.0], [0.0, 0.5]]), -1.0, 1.0, cell=2)
    assert img.shape == (3, 4, 4)
    torch.testing.assert_close(img[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))  # vmax: blue
    torch.testing.assert_close(img[:, 0, 2], torch.tensor([1.0, 0.0, 0.0]))  # vmin: red
    torch.testing.assert_close(img[:, 2, 0], torch.tensor([1.0, 1.0, 1.0]))  # middle: white
