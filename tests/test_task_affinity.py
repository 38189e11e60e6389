"""Lookahead task affinity (Fifty et al. 2021) on a hand-computable quadratic, and no side effects."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyNet, flat_params, loader, make_data, trainer
from torch import nn

from lightning_mtl import MultiTaskModule
from lightning_mtl.callbacks import TaskAffinity, lookahead_affinity

TARGETS = {"a": (1.0, 0.0), "b": (0.0, 2.0), "c": (2.0, 0.5)}
W0 = (0.5, 0.5)


class Quadratic(MultiTaskModule):
    """Shared w in R^2, L_k = ||w - t_k||^2: the lookahead losses have a closed form."""

    def __init__(self, lr: float = 0.0):
        super().__init__(tasks=list(TARGETS))
        self.w = nn.Parameter(torch.tensor(W0))
        self.register_buffer("targets", torch.tensor(list(TARGETS.values())))
        self.lr = lr

    def shared_parameters(self):
        return [self.w]

    def task_losses(self, batch, batch_idx):
        one = batch[0].mean() * 0 + 1
        return {k: one * ((self.w - self.targets[i]) ** 2).sum() for i, k in enumerate(TARGETS)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def hand_affinity(lr: float) -> torch.Tensor:
    w = torch.tensor(W0, dtype=torch.float64)
    t = torch.tensor(list(TARGETS.values()), dtype=torch.float64)
    base = ((w - t) ** 2).sum(1)
    Z = torch.empty(3, 3, dtype=torch.float64)
    for i in range(3):
        w_i = w - lr * 2 * (w - t[i])  # one SGD step on task i alone
        Z[i] = 1 - ((w_i - t) ** 2).sum(1) / base
    return Z.float()


def test_lookahead_affinity_formula():
    Z = lookahead_affinity(torch.tensor([2.0, 4.0]), torch.tensor([[1.0, 5.0], [3.0, 2.0]]))
    torch.testing.assert_close(Z, torch.tensor([[0.5, -0.25], [-0.5, 0.5]]))


def test_affinity_matches_closed_form():
    cb = TaskAffinity(every_n_steps=2, lr=0.1)
    trainer(max_epochs=1, callbacks=[cb]).fit(Quadratic(lr=0.0), loader(make_data(n=5 * 4), batch_size=4))
    assert cb._count == 3  # steps 0, 2, 4
    expected = hand_affinity(0.1)
    torch.testing.assert_close(cb.affinity, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cb.last, expected, atol=1e-6, rtol=1e-5)
    assert expected[0, 1] < 0 < expected[0, 0]  # the case is not degenerate: a step on a hurts b
    assert cb.table()["a"]["b"] == pytest.approx(float(expected[0, 1]), rel=1e-5)


def test_default_lr_is_the_optimizers():
    cb = TaskAffinity(every_n_steps=100)
    trainer(max_epochs=1, callbacks=[cb]).fit(Quadratic(lr=0.05), loader(make_data(n=8), batch_size=4))
    assert cb._count == 1  # measured at step 0, before the first update
    torch.testing.assert_close(cb.affinity, hand_affinity(0.05), atol=1e-6, rtol=1e-5)


class DropoutBatchNormNet(TinyNet):
    """Dropout (uses the RNG) and BatchNorm (running statistics): the lookahead must leave both untouched."""

    def __init__(self):
        super().__init__(optimizer="adam")
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3))


def test_affinity_does_not_change_training_rng_or_buffers():
    ds = make_data(n=48)
    torch.manual_seed(1)
    plain = DropoutBatchNormNet()
    trainer(max_epochs=2).fit(plain, loader(ds))
    after_plain = torch.rand(3)
    torch.manual_seed(1)
    watched = DropoutBatchNormNet()
    cb = TaskAffinity(every_n_steps=1)
    trainer(max_epochs=2, callbacks=[cb]).fit(watched, loader(ds))
    after_watched = torch.rand(3)
    assert cb._count == 6
    assert torch.equal(flat_params(plain), flat_params(watched))
    for b0, b1 in zip(plain.buffers(), watched.buffers()):
        assert torch.equal(b0, b1)
    assert torch.equal(after_plain, after_watched)
    assert torch.isfinite(cb.affinity).all()


def test_validation_and_state():
    with pytest.raises(ValueError, match="lr must be a number > 0 or None"):
        TaskAffinity(lr=0)
    with pytest.raises(ValueError, match="every_n_steps must be an int >= 1"):
        TaskAffinity(every_n_steps=1.5)
    cb = TaskAffinity(every_n_steps=1, lr=0.1)
    trainer(callbacks=[cb]).fit(Quadratic(), loader(make_data(n=8), batch_size=4))
    fresh = TaskAffinity(every_n_steps=1, lr=0.1)
    fresh.load_state_dict(cb.state_dict())
    torch.testing.assert_close(fresh.affinity, cb.affinity)


def test_print_table(capsys):
    cb = TaskAffinity(every_n_steps=1, lr=0.1, print_table=True)
    trainer(callbacks=[cb]).fit(Quadratic(), loader(make_data(n=8), batch_size=4))
    out = capsys.readouterr().out
    assert "task affinity" in out and f"{float(hand_affinity(0.1)[0, 1]):+.3g}" in out
