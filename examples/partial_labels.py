"""Partial labels: a task labelled on a few samples of each batch, and a task labelled on some batches only.

Generated data: inputs x ∈ ℝ⁸ and three regression targets read from one shared feature. ``score`` is labelled on
every sample; ``rare`` on about 10 % of the samples (unlabelled targets are stored as NaN, as real data often is:
they are filled before the loss and ``masked_mean`` averages over the labelled ones); ``survey`` exists only in every third batch (as if it came from a
separate collection), so it is declared ``Task("survey", partial=True)`` and left out of the other batches. The
module combines each task exactly — under DDP too, where each rank holds a different number of labelled samples —
and logs ``train/labelled/<task>``; validation averages each task over its labelled samples only.

    python examples/partial_labels.py --strategy PCGrad --epochs 5
    python examples/partial_labels.py --strategy UncertaintyWeighting
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl import MultiTaskModule, Task, masked_mean
from lightning_mtl.cli.registry import make_strategy

TASKS = ("score", "rare", "survey")


def make_data(n: int, seed: int, rare_fraction: float = 0.1) -> TensorDataset:
    """x ~ N(0, I₈); the three targets read tanh(Wx) with their own readouts; ``rare`` is NaN where unlabelled."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, 8, generator=g)
    feature = torch.tanh(x @ w)
    readouts = torch.randn(16, 3, generator=torch.Generator().manual_seed(1)) / 4
    y = feature @ readouts + 0.05 * torch.randn(n, 3, generator=g)
    unlabelled = torch.rand(n, generator=g) > rare_fraction
    y[unlabelled, 1] = float("nan")
    return TensorDataset(x, y)


class PartialNet(MultiTaskModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__(tasks=[Task("score"), Task("rare"), Task("survey", partial=True)])
        self.encoder = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(32, 1) for t in TASKS})
        self.lr = lr

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        out = {t: self.heads[t](z).squeeze(1) for t in TASKS}
        # `rare` is NaN where unlabelled: fill it before the loss, or NaN × 0 would reach the gradient
        labelled = ~torch.isnan(y[:, 1])
        rare = torch.where(labelled, y[:, 1], 0.0)
        losses = {
            "score": nn.functional.mse_loss(out["score"], y[:, 0]),
            "rare": masked_mean((out["rare"] - rare) ** 2, labelled),  # the mean over the labelled samples
        }
        if batch_idx % 3 == 0 or not self.training:  # survey labels come with every third training batch
            losses["survey"] = nn.functional.mse_loss(out["survey"], y[:, 2])
        return losses

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="EqualWeighting", help="any strategy that handles absent tasks")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[make_strategy(args.strategy)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train, val = make_data(3000, seed=1), make_data(600, seed=2)
    trainer.fit(PartialNet(), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=200))
    results = {t: float(trainer.callback_metrics[f"val/loss/{t}"]) for t in TASKS}
    print(f"{args.strategy}: validation MSE over labelled samples {results}")
    return results


if __name__ == "__main__":
    main()
