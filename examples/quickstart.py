"""Quick start: a shared encoder with three task heads, trained with a strategy of your choice.

The data is generated: three regression tasks of very different scales and noise levels on the same inputs,
the situation where the choice of loss weighting matters. Run::

    python examples/quickstart.py --strategy UncertaintyWeighting --out runs
    tensorboard --logdir runs      # custom-scalars tab: all task weights in one chart, all losses in another
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_mtl.strategies as strategies
from lightning_mtl import MultiTaskModule, Task


def make_dataset(n: int = 2048, seed: int = 0) -> TensorDataset:
    """x ~ N(0, I₁₆); task k predicts scaleₖ·tanh(Aₖx) + noise, with scales 1, 10 and 0.1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    shared = torch.randn(16, 4, generator=g)
    targets = []
    for scale, noise in [(1.0, 0.1), (10.0, 1.0), (0.1, 0.05)]:
        a = shared + 0.3 * torch.randn(16, 4, generator=g)
        targets.append(scale * torch.tanh(x @ a) + noise * torch.randn(n, 4, generator=g))
    return TensorDataset(x, *targets)


class ThreeTaskNet(MultiTaskModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__(tasks=[Task("small"), Task("large"), Task("tiny")])
        self.encoder = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(64, 4) for name in self.task_names})
        self.lr = lr

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch, batch_idx):
        x, *targets = batch
        z = self.encoder(x)
        return {
            name: nn.functional.mse_loss(self.heads[name](z), y) for name, y in zip(self.task_names, targets)
        }

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--strategy", default="UncertaintyWeighting", help="a class of lightning_mtl.strategies"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="runs")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    train, val = make_dataset(2048, seed=0), make_dataset(512, seed=1)
    strategy = getattr(strategies, args.strategy)()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[strategy],
        logger=TensorBoardLogger(args.out, name=args.strategy),
        log_every_n_steps=10,
        enable_model_summary=False,
    )
    trainer.fit(
        ThreeTaskNet(), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256)
    )
    print(
        f"final task weights ({args.strategy}):",
        {k: round(v, 4) for k, v in (strategy.weights or {}).items()},
    )
    print(
        "validation losses:",
        {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if "val/" in k},
    )


if __name__ == "__main__":
    main()
