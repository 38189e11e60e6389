"""One dataset per task: two regression tasks from datasets of different sizes, combined by MultiTaskLoader.

The data is generated: the same inputs distribution, a shared non-linear feature, and two targets — "house"
(4000 samples) and "rent" (only 400 samples, noisier). Each task has its own DataLoader; ``MultiTaskLoader``
yields ``{task: (x, y)}`` batches: in ``joint`` mode (the default) every step has both tasks and the small task's
loader is cycled; ``--mode sampled`` draws one task per step with probabilities ∝ dataset size^(1/τ).

Each task is validated on its own validation set (``task_eval_loaders``: one loader per task, keyed batches), so
the logged ``val/loss/<task>/dataloader_idx_<k>`` is task ``k``'s loss on its own data. The tasks are declared
``partial=True`` because an evaluation batch (and a sampled training batch) holds one task only. Run::

    python examples/multitask_loader.py                      # joint
    python examples/multitask_loader.py --mode sampled --temperature 2
    lightning-mtl compare --config examples/multitask_loader_config.yaml --strategies equal,pcgrad,mgda --epochs 3
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.data import MultiTaskLoader, task_eval_loaders


def make_task(n: int, target: int, noise: float, seed: int) -> TensorDataset:
    """x ~ N(0, I₈); both tasks read the same feature tanh(Wx) (W fixed), each with its own readout."""
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))  # shared by both tasks
    readout = torch.randn(16, generator=torch.Generator().manual_seed(100 + target))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x @ w) @ readout / 4 + noise * torch.randn(n, generator=g)
    return TensorDataset(x, y)


class TwoDatasetNet(MultiTaskModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__(tasks=[Task("house", partial=True), Task("rent", partial=True)])
        self.encoder = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh())
        self.heads = nn.ModuleDict({name: nn.Linear(32, 1) for name in self.task_names})
        self.lr = lr

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch, batch_idx):
        # batch = {task: (x, y)}: only the tasks of this step (all of them in joint mode)
        return {
            task: nn.functional.mse_loss(self.heads[task](self.encoder(x)).squeeze(1), y)
            for task, (x, y) in batch.items()
        }

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class TwoDatasetData(pl.LightningDataModule):
    """The two tasks' datasets as a data module (for LightningCLI and ``lightning-mtl compare --config``): a
    ``MultiTaskLoader`` for training, one validation loader per task.

    Args:
        mode: ``"joint"`` or ``"sampled"`` (see :class:`~lightning_mtl.data.MultiTaskLoader`).
        temperature: sampled mode: p ∝ dataset size^(1/τ).
        batch_size: per task.
    """

    def __init__(self, mode: str = "joint", temperature: float = 1.0, batch_size: int = 64) -> None:
        super().__init__()
        self.mode, self.temperature, self.batch_size = mode, temperature, batch_size
        self.train = {"house": make_task(4000, 0, 0.05, seed=1), "rent": make_task(400, 1, 0.2, seed=2)}
        self.val = {"house": make_task(500, 0, 0.05, seed=3), "rent": make_task(500, 1, 0.2, seed=4)}

    def train_dataloader(self) -> MultiTaskLoader:
        sampled = (
            {"weights": "proportional", "temperature": self.temperature} if self.mode == "sampled" else {}
        )
        loaders = {
            task: DataLoader(ds, batch_size=self.batch_size, shuffle=True) for task, ds in self.train.items()
        }
        return MultiTaskLoader(loaders, mode=self.mode, **sampled)

    def val_dataloader(self) -> list[DataLoader]:
        return task_eval_loaders({task: DataLoader(ds, batch_size=250) for task, ds in self.val.items()})


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["joint", "sampled"], default="joint")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampled mode: p ∝ size^(1/τ)")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)

    pl.seed_everything(0)  # MultiTaskLoader's seed defaults to it
    train = {"house": make_task(4000, 0, 0.05, seed=1), "rent": make_task(400, 1, 0.2, seed=2)}
    val = {"house": make_task(500, 0, 0.05, seed=3), "rent": make_task(500, 1, 0.2, seed=4)}
    sampled = {"weights": "proportional", "temperature": args.temperature} if args.mode == "sampled" else {}
    train_loader = MultiTaskLoader(
        {task: DataLoader(ds, batch_size=64, shuffle=True) for task, ds in train.items()},
        mode=args.mode,
        **sampled,
    )
    print(train_loader, f"{len(train_loader)} steps per epoch")
    val_loaders = task_eval_loaders({task: DataLoader(ds, batch_size=250) for task, ds in val.items()})

    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(TwoDatasetNet(), train_loader, val_loaders)
    results = {
        task: float(trainer.callback_metrics[f"val/loss/{task}/dataloader_idx_{k}"])
        for k, task in enumerate(train)
    }
    for task, loss in results.items():
        print(f"val/loss/{task}: {loss:.4f}  (target variance {val[task].tensors[1].var():.4f})")
    return results


if __name__ == "__main__":
    main()
