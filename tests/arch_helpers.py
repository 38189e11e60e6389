"""Helpers of the architecture tests (tests/nn): which parameters each task reaches, the exact shared set, and a
``MultiTaskModule`` holding an architecture."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl import MultiTaskModule


def reached(arch: nn.Module, x: torch.Tensor) -> dict[str, set[int]]:
    """Per task, the ids of the parameters its output reaches (a non-zero gradient of a random projection)."""
    params = [p for p in arch.parameters() if p.requires_grad]
    out = arch(x)
    g = torch.Generator().manual_seed(1)
    found = {}
    for t, y in out.items():
        w = torch.randn(y.shape, generator=g)
        grads = torch.autograd.grad((y * w).sum(), params, retain_graph=True, allow_unused=True)
        found[t] = {
            id(p) for p, gr in zip(params, grads, strict=True) if gr is not None and gr.abs().sum() > 0
        }
    return found


def check_sharing(arch, x: torch.Tensor) -> set[int]:
    """shared_parameters() is exactly the set ≥ 2 tasks reach (each once); task_parameters() the rest."""
    counts = Counter(i for ids in reached(arch, x).values() for i in ids)
    expected = {i for i, c in counts.items() if c >= 2}
    shared = [id(p) for p in arch.shared_parameters()]
    assert len(shared) == len(set(shared))
    assert set(shared) == expected
    assert {id(p) for p in arch.task_parameters()} == {id(p) for p in arch.parameters()} - expected
    return expected


class HeldModule(MultiTaskModule):
    """A MultiTaskModule holding an architecture (MSE per task); it takes the shared parameters from it."""

    def __init__(self, arch, lr: float = 0.05) -> None:
        super().__init__(tasks=list(arch.task_names))
        self.arch, self.lr = arch, lr

    def task_losses(self, batch, batch_idx):
        x, y = batch
        out = self.arch(x)
        return {t: F.mse_loss(out[t].squeeze(-1), y[:, i]) for i, t in enumerate(self.task_names)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ArchModule(HeldModule):
    """:class:`HeldModule` declaring ``shared_parameters()`` from the architecture by hand."""

    def shared_parameters(self):
        return self.arch.shared_parameters()
