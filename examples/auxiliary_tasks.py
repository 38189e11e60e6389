"""Auxiliary tasks: a main task helped (or hurt) by tasks that are trained but are not results.

Generated data (nothing is downloaded): inputs ``x`` (12 features) drive 4 latent factors ``s = tanh(Ax)``.

* ``target`` (main): a noisy non-linear function of the latent factors, with few labelled samples;
* ``factors`` (auxiliary, helpful): the 4 latent factors themselves, a dense signal for the shared encoder;
* ``noise`` (auxiliary, harmful): random labels, five times the scale of the main target: its gradient
  on the encoder is noise that competes with the main task;
* ``opposed`` (auxiliary, adversarial): ``4 / (1 + L_target)`` through the main head's weights detached, a
  "confusion" objective whose gradient on the encoder is exactly opposed to the main task's (cos = −1).

Declared with ``Task(name, role="auxiliary")``, the auxiliary tasks are trained but not reported: the
``MTLSummary`` table, Δm% and ``lightning-mtl compare`` use the main task. The auxiliary-learning strategies
decide per step how much of each auxiliary gradient the shared encoder takes::

    python examples/auxiliary_tasks.py --strategy gcs          # GCS: aux gradient only where cos > 0
    python examples/auxiliary_tasks.py --strategy all          # main alone, equal, GCS, GCS weighted, ...

It prints the main task's validation MAE and the final auxiliary weights of each strategy. Measured once
(``--strategy all --epochs 10``, seed 0, CPU): main alone 0.60, equal weighting 0.84 (``opposed`` drags the
encoder back), GCS 0.66 (gates ``noise`` and ``opposed`` shut), GCS weighted 0.60, HydaLearn 0.62, OLAUX 0.81
(its ``opposed`` weight falls only every N = 5 steps, to 0.54 by then). One seed on a toy: read it as the
wiring, not a benchmark; ``tests/strategies/test_auxiliary.py`` has the case built to expose GCS.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.regression import MeanAbsoluteError

from lightning_mtl import MultiTaskModule, Task

AUXILIARY = ("factors", "noise", "opposed")
IN_DIM, LATENT = 12, 4


def make_tensors(n_train: int = 48, n_val: int = 512, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Inputs ``[N, 12]`` and targets ``[N, 6]``: main target, 4 latent factors, noise label."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val
    x = torch.randn(n, IN_DIM, generator=g)
    s = torch.tanh(x @ torch.randn(IN_DIM, LATENT, generator=g) / IN_DIM**0.5 * 2)
    target = (s**2) @ torch.randn(LATENT, generator=g) + s @ torch.randn(LATENT, generator=g)
    target = (target - target.mean()) / target.std() + 0.1 * torch.randn(n, generator=g)
    noise = 5.0 * torch.randn(n, generator=g)
    y = torch.cat([target[:, None], s, noise[:, None]], 1)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


class AuxDataModule(pl.LightningDataModule):
    """Train / validation loaders of the generated data (``n_train`` / 512 samples).

    Args:
        batch_size: batch size.
        n_train: labelled training samples.
        seed: seed of the generated data.
    """

    def __init__(self, batch_size: int = 16, n_train: int = 48, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_set, self.val_set = make_tensors(n_train, seed=seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class AuxNet(MultiTaskModule):
    """A shared MLP encoder, one head per task; ``target`` is the main task.

    Args:
        auxiliary: which auxiliary tasks to train (``factors``, ``noise``, ``opposed``; default all three; ``[]``:
            main alone).
        hidden: width of the encoder.
        lr: Adam learning rate.
    """

    def __init__(self, auxiliary: Sequence[str] | None = None, hidden: int = 32, lr: float = 3e-3) -> None:
        auxiliary = list(AUXILIARY if auxiliary is None else auxiliary)
        tasks = [Task("target", metrics={"mae": MeanAbsoluteError()})]
        tasks += [
            Task(name, role="auxiliary", metrics=None if name == "opposed" else {"mae": MeanAbsoluteError()})
            for name in auxiliary
        ]
        super().__init__(tasks=tasks)
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Linear(IN_DIM, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.heads = nn.ModuleDict(
            {t: nn.Linear(hidden, LATENT if t == "factors" else 1) for t in self.task_names if t != "opposed"}
        )
        self.lr = lr

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        targets = {"target": y[:, 0], "factors": y[:, 1 : 1 + LATENT], "noise": y[:, -1]}
        losses, outputs = {}, {}
        for task in self.task_names:
            if (
                task == "opposed"
            ):  # the main head's prediction with its weights detached: reaches the encoder only
                head = self.heads["target"]
                pred = nn.functional.linear(z, head.weight.detach(), head.bias.detach()).squeeze(1)
                losses[task] = 4.0 / (1.0 + nn.functional.mse_loss(pred, targets["target"]))
                continue
            out = self.heads[task](z)
            out = out if task == "factors" else out.squeeze(1)
            losses[task] = nn.functional.mse_loss(out, targets[task])
            outputs[task] = (out.flatten(), targets[task].flatten())
        return losses, outputs

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_strategy(name: str):
    """The strategy callback of ``--strategy`` (``None``: equal weighting)."""
    from lightning_mtl.strategies.gcs import GCS
    from lightning_mtl.strategies.hydalearn import HydaLearn
    from lightning_mtl.strategies.olaux import OLAUX

    return {
        "main-only": None,
        "equal": None,
        "gcs": GCS(),
        "gcs-weighted": GCS(weighted=True),
        "olaux": OLAUX(beta=0.01, horizon=5),
        "hydalearn": HydaLearn(max_weight=2.0),
    }[name]


STRATEGIES = ("main-only", "equal", "gcs", "gcs-weighted", "olaux", "hydalearn")


def run(name: str, epochs: int, seed: int = 0) -> tuple[float, dict[str, float] | None]:
    """Train with strategy ``name``; returns the main task's validation MAE and the final weights."""
    pl.seed_everything(seed, verbose=False)
    model = AuxNet(auxiliary=[] if name == "main-only" else None)
    strategy = make_strategy(name)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[] if strategy is None else [strategy],
    )
    trainer.fit(model, AuxDataModule(seed=seed))
    return float(trainer.callback_metrics["val/target/mae"]), model.strategy.weights


def main(argv: Sequence[str] | None = None) -> dict[str, tuple[float, dict[str, float] | None]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="gcs", choices=[*STRATEGIES, "all"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    names = STRATEGIES if args.strategy == "all" else (args.strategy,)
    results = {}
    for name in names:
        mae, weights = run(name, args.epochs, args.seed)
        results[name] = (mae, weights)
        aux = {k: round(v, 3) for k, v in (weights or {}).items() if k != "target"}
        print(f"{name:>13}: main-task val MAE {mae:.4f}   auxiliary weights {aux or '-'}")
    return results


if __name__ == "__main__":
    main()
