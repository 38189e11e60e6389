"""Your own multi-task model, configured from YAML: three tasks on scikit-learn's bundled wine data.

Tasks, from the 13 chemical measurements of 178 wines (scikit-learn ships the data; nothing is downloaded):

* ``cultivar``: which of 3 cultivars (classification, cross-entropy, accuracy);
* ``alcohol``: the alcohol content, predicted from the other 12 measurements (regression, MSE, MAE);
* ``color``: the colour intensity, likewise (regression, MSE, MAE).

The model returns ``(losses, outputs)`` from ``task_losses`` so that the module can update each task's
torchmetrics metrics without a second forward pass. Run it from the repository root::

    lightning-mtl fit --config examples/compare_config.yaml           # one run, the YAML's strategy
    lightning-mtl compare --config examples/compare_config.yaml       # every default strategy on this model
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanAbsoluteError

from lightning_mtl import MultiTaskModule, Task

ALCOHOL, COLOR = 0, 9  # columns of sklearn.datasets.load_wine().data
TASKS = ("cultivar", "alcohol", "color")


def wine_tensors(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Standardised inputs (the two regression targets removed) and targets ``[cultivar, alcohol, color]``
    (the regression targets standardised too)."""
    from sklearn.datasets import load_wine

    bunch = load_wine()
    data = torch.tensor(bunch.data, dtype=torch.float32)
    keep = [i for i in range(data.shape[1]) if i not in (ALCOHOL, COLOR)]
    x = data[:, keep]
    y = torch.stack([torch.tensor(bunch.target, dtype=torch.float32), data[:, ALCOHOL], data[:, COLOR]], 1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:40], perm[40:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    y[:, 1:] = (y[:, 1:] - y[train, 1:].mean(0)) / y[train, 1:].std(0)  # regression targets in std units
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class WineDataModule(pl.LightningDataModule):
    """Train / validation loaders of the wine tasks (138 / 40 wines).

    Args:
        batch_size: batch size.
        seed: seed of the train/validation split.
    """

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_set, self.val_set = wine_tensors(seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class WineNet(MultiTaskModule):
    """A shared MLP encoder and one head per task.

    Args:
        tasks: which of ``cultivar``, ``alcohol``, ``color`` to learn (default: all three).
        hidden: width of the encoder.
        lr: Adam learning rate.
    """

    def __init__(self, tasks: list[str] | None = None, hidden: int = 32, lr: float = 1e-2) -> None:
        tasks = list(TASKS) if tasks is None else tasks
        specs = {
            "cultivar": Task("cultivar", kind="classification", metrics={"acc": MulticlassAccuracy(3)}),
            "alcohol": Task("alcohol", metrics={"mae": MeanAbsoluteError()}),
            "color": Task("color", metrics={"mae": MeanAbsoluteError()}),
        }
        super().__init__(tasks=[specs[t] for t in tasks])
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(11, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleDict(
            {t: nn.Linear(hidden, 3 if t == "cultivar" else 1) for t in self.task_names}
        )
        self.lr = lr

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        losses, outputs = {}, {}
        for task in self.task_names:
            out = self.heads[task](z)
            target = y[:, TASKS.index(task)]
            if task == "cultivar":
                labels = target.long()
                losses[task] = nn.functional.cross_entropy(out, labels)
                outputs[task] = (out, labels)
            else:
                losses[task] = nn.functional.mse_loss(out.squeeze(1), target)
                outputs[task] = (out.squeeze(1), target)
        return losses, outputs

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)
