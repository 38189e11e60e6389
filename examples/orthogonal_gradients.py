"""Orthogonal gradients: a regulariser next to any strategy, pushing the task gradients towards orthogonality.

Suteu & Guo, "Regularizing Deep Multi-Task Networks using Orthogonal Gradients", arXiv:1912.06844.
``OrthogonalGradients(weight=λ)`` adds ``λ · Σ_{i<j} cos²(gᵢ, gⱼ)`` to the objective, ``gᵢ`` the gradient of task
``i`` on the shared encoder (a double backward: each step costs about ``2T + 1`` backward passes instead of 1).
It is a *regulariser*, not a strategy: attach it next to the one strategy you use (``--strategy``).

The data is generated: three regression tasks on the same inputs whose targets are strongly correlated (two are
almost the same function), so their gradients on the shared encoder start nearly parallel. The script trains
the same model twice, without and with the regulariser, measures the task-gradient cosines every step with
``GradientConflictMonitor`` and prints the mean |cos| and the validation losses of both runs::

    python examples/orthogonal_gradients.py
    python examples/orthogonal_gradients.py --strategy PCGrad --weight 0.5 --accumulate 2
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_mtl.strategies as strategies
from lightning_mtl import MultiTaskModule
from lightning_mtl.callbacks.gradient_conflict import GradientConflictMonitor
from lightning_mtl.regularizers import OrthogonalGradients

TASKS = ("a", "b", "c")


def make_dataset(n: int = 1024, seed: int = 0) -> TensorDataset:
    """x ~ N(0, I₈); a = tanh(x·w), b = a + 0.3·tanh(x·v) (correlated with a), c = tanh(x·u) + 0.5·a."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w, v, u = (torch.randn(8, generator=g) for _ in range(3))
    a = torch.tanh(x @ w)
    b = a + 0.3 * torch.tanh(x @ v)
    c = torch.tanh(x @ u) + 0.5 * a
    y = torch.stack([a, b, c], 1) + 0.05 * torch.randn(n, 3, generator=g)
    return TensorDataset(x, y)


class CorrelatedTasks(MultiTaskModule):
    def __init__(self, accumulate_grad_batches: int = 1, lr: float = 0.05) -> None:
        super().__init__(tasks=list(TASKS), accumulate_grad_batches=accumulate_grad_batches)
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(32, 1) for t in TASKS})
        self.lr = lr

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        return {t: nn.functional.mse_loss(self.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate(TASKS)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _AbsCosine(pl.Callback):
    """Mean |cos| over the task pairs of every measurement of the monitor."""

    def __init__(self, monitor: GradientConflictMonitor) -> None:
        self.monitor, self.values, self._seen = monitor, [], -1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        last = self.monitor.last
        if last is not None and last["step"] != self._seen:
            self._seen = last["step"]
            cos = last["cosine"]
            iu = torch.triu_indices(cos.shape[0], cos.shape[0], offset=1)
            self.values.append(float(cos[iu[0], iu[1]].abs().mean()))


def run(weight: float, strategy: str | None, epochs: int, accumulate: int) -> dict[str, Any]:
    data = make_dataset()
    train, val = torch.utils.data.random_split(data, [896, 128], generator=torch.Generator().manual_seed(0))
    model = CorrelatedTasks(accumulate_grad_batches=accumulate)
    monitor = GradientConflictMonitor(every_n_steps=1, log_heatmap=False)
    recorder = _AbsCosine(monitor)
    callbacks: list[pl.Callback] = [monitor, recorder]
    if strategy is not None:
        callbacks.append(getattr(strategies, strategy)())
    if weight > 0:
        callbacks.append(OrthogonalGradients(weight=weight))
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=128))
    metrics = trainer.callback_metrics
    return {
        "mean_abs_cos": sum(recorder.values) / max(len(recorder.values), 1),
        "val": {t: float(metrics[f"val/loss/{t}"]) for t in TASKS},
        "penalty": float(metrics["train/orthogonal/penalty"]) if weight > 0 else None,
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weight", type=float, default=1.0, help="λ of OrthogonalGradients (default 1.0)")
    parser.add_argument(
        "--strategy", default=None, help="a strategy class name, e.g. PCGrad (default: equal)"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches (default 1)")
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    results = {
        "without": run(0.0, args.strategy, args.epochs, args.accumulate),
        f"with λ={args.weight:g}": run(args.weight, args.strategy, args.epochs, args.accumulate),
    }
    print(f"{'run':<14}{'mean |cos|':>12}  " + "  ".join(f"val/{t:<6}" for t in TASKS) + "  penalty")
    for name, r in results.items():
        penalty = "" if r["penalty"] is None else f"{r['penalty']:.4f}"
        losses = "  ".join(f"{r['val'][t]:10.4f}" for t in TASKS)
        print(f"{name:<14}{r['mean_abs_cos']:>12.3f}  {losses}  {penalty}")
    return results


if __name__ == "__main__":
    main()
