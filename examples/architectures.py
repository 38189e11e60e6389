"""Train any architecture of ``lightning_mtl.nn`` with any strategy on the built-in digits data.

No ``shared_parameters()`` is written anywhere here: the architecture declares which of its parameters the tasks
share, and the gradient strategies take their per-task gradients on exactly those.

    python examples/architectures.py --arch MMoE --strategy PCGrad --epochs 3
    python examples/architectures.py --arch HardSharing --strategy MGDA --mode representation

Architectures: HardSharing, CrossStitch, MTAN, MMoE, CGC, PLE, DSelectK, TaskRouting, MultiBackbone.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.cli.registry import resolve_strategy
from lightning_mtl.datasets import BuiltinDataModule, load_dataset
from lightning_mtl.nn import ARCHITECTURES, build_architecture, resolve_architecture


class DigitsModel(MultiTaskModule):
    """Three tasks on 8×8 digits: the digit (10 classes), its parity (binary) and its value (regression)."""

    def __init__(self, arch: str, hidden: int = 64, lr: float = 3e-3) -> None:
        super().__init__(
            tasks=[Task("digit", kind="classification"), Task("parity", kind="classification"), "value"]
        )
        data = load_dataset("digits")
        self.columns = [data.task_names.index(t) for t in self.task_names]
        self.model = build_architecture(
            arch, self.task_names, data.in_dim, {"digit": 10, "parity": 1, "value": 1}, hidden
        )
        self.lr = lr

    def task_losses(self, batch, batch_idx):
        x, y = batch
        out = self.model(x)
        digit, parity, value = (y[:, c] for c in self.columns)
        losses = {
            "digit": nn.functional.cross_entropy(out["digit"], digit.long()),
            "parity": nn.functional.binary_cross_entropy_with_logits(out["parity"].squeeze(1), parity),
            "value": nn.functional.mse_loss(out["value"].squeeze(1), value),
        }
        for task, term in getattr(self.model, "aux_losses", {}).items():  # DSelect-k's selector regulariser
            losses[task] = losses[task] + term
        return losses

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="HardSharing", help=f"one of {', '.join(ARCHITECTURES)}")
    parser.add_argument(
        "--strategy", default="EqualWeighting", help="a strategy name, e.g. PCGrad, MGDA, DWA"
    )
    parser.add_argument("--mode", default=None, help="parameters or representation (gradient strategies)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    cls = resolve_strategy(args.strategy)
    strategy = cls(mode=args.mode) if args.mode else cls()
    arch = resolve_architecture(args.arch)
    model = DigitsModel(arch)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[strategy],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=BuiltinDataModule("digits", batch_size=args.batch_size))
    shared = sum(p.numel() for p in model.shared_parameters())
    total = sum(p.numel() for p in model.parameters())
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/loss")}
    print(f"{arch} + {cls.__name__}: {shared:,} of {total:,} parameters shared; {losses}")
    return losses


if __name__ == "__main__":
    main()
