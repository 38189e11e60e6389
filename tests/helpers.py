"""Small models and data shared by the tests."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_mtl import MultiTaskModule, Task


def make_data(n: int = 64, in_dim: int = 6, num_tasks: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    ys = [
        (x @ torch.randn(in_dim, 1, generator=g)).squeeze(1) * (k + 1) + 0.1 * torch.randn(n, generator=g)
        for k in range(num_tasks)
    ]
    return TensorDataset(x, torch.stack(ys, 1))


class TinyNet(MultiTaskModule):
    """Shared linear encoder + one linear head per task; MSE per task."""

    def __init__(
        self,
        tasks: Sequence[str | Task] = ("a", "b", "c"),
        in_dim: int = 6,
        hidden: int = 8,
        lr: float = 0.05,
        optimizer: str = "sgd",
        **kwargs: Any,
    ) -> None:
        super().__init__(tasks=tasks, **kwargs)
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, 1) for t in self.task_names})
        self.lr = lr
        self.optimizer_name = optimizer

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        return {
            t: nn.functional.mse_loss(self.heads[t](z).squeeze(1), y[:, i])
            for i, t in enumerate(self.task_names)
        }

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def loader(ds: TensorDataset, batch_size: int = 16) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@contextmanager
def restore_environ():
    """Restore os.environ after a (distributed) test: leaked MASTER_PORT etc. cause EADDRINUSE."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class RecordState(pl.Callback):
    """Saves, per rank, the final parameters and strategy weights/state to ``<directory>/rank<k>.pt``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: MultiTaskModule) -> None:
        strategy = pl_module.strategy
        torch.save(
            {
                "params": flat_params(pl_module),
                "weights": strategy.weights,
                "state": strategy.state_dict(),
                "global_step": trainer.global_step,
            },
            os.path.join(self.directory, f"rank{trainer.global_rank}.pt"),
        )


def load_record(directory: str, rank: int = 0) -> dict[str, Any]:
    return torch.load(os.path.join(directory, f"rank{rank}.pt"), weights_only=False)


class ScalarNet(MultiTaskModule):
    """One shared scalar θ; task i has loss kᵢ(θ − tᵢ)², so ∇Lᵢ = 2kᵢ(θ − tᵢ): hand-computable updates."""

    def __init__(self, k=(1.0, 2.0), targets=(0.0, 3.0), theta: float = 1.0, lr: float = 0.1, **kwargs: Any):
        names = kwargs.pop("tasks", [f"t{i}" for i in range(len(k))])
        super().__init__(tasks=names, **kwargs)
        self.theta = nn.Parameter(torch.tensor(float(theta)))
        self.k = torch.tensor(k)
        self.targets = torch.tensor(targets)
        self.lr = lr

    def shared_parameters(self):
        return [self.theta]

    def task_losses(self, batch, batch_idx):
        return {n: self.k[i] * (self.theta - self.targets[i]) ** 2 for i, n in enumerate(self.task_names)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def dummy_loader(steps: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1)


class ConflictNet(TinyNet):
    """TinyNet whose task c is trained towards -2 x task a's target: conflicting gradients."""

    def task_losses(self, batch, batch_idx):
        x, y = batch
        return super().task_losses((x, torch.stack([y[:, 0], y[:, 1], -2 * y[:, 0]], 1)), batch_idx)


class RepTinyNet(TinyNet):
    """:class:`TinyNet` that marks its encoder output with ``shared_representation`` (representation mode)."""

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.shared_representation(self.encoder(x))
        return {
            t: nn.functional.mse_loss(self.heads[t](z).squeeze(1), y[:, i])
            for i, t in enumerate(self.task_names)
        }


def bound(strategy: Any, names: Sequence[str] = ("a", "b")) -> Any:
    """``strategy`` attached to tasks ``names`` (what ``setup`` does), for tests that call it directly."""
    strategy.bind([Task(n) for n in names])
    return strategy


def single_process_batches(ds: TensorDataset, batch_size: int, epochs: int) -> list[torch.Tensor]:
    """The sample indices of each batch of ``batch_size`` that :func:`ddp_parity_records`' single process sees
    over ``epochs`` epochs (the permutation Lightning's ``DistributedSampler`` gives, seed 0): the union of the
    two ranks' batches of ``batch_size // 2``, rank ``r`` taking the samples ``r::2``."""
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches += list(torch.tensor(list(sampler)).view(-1, batch_size))
    return batches


def ddp_parity_records(
    tmp_path: Any,
    make_strategy: Any,
    *,
    epochs: int,
    batch_size: int = 8,
    n: int = 64,
    model: Any = TinyNet,
    tag: str = "run",
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Train ``model()`` with ``make_strategy()`` on 2 ``ddp_spawn`` CPU ranks × ``batch_size`` and on one
    process × ``2·batch_size`` with the permutation Lightning's injected ``DistributedSampler`` gives the ranks
    (seed 0), and return the :class:`RecordState` records ``(single, rank0, rank1)``: batch k of the single
    process is the union of the ranks' batches k. ``os.environ`` is restored (and ``PL_GLOBAL_SEED`` unset
    during the runs)."""
    ds = make_data(n=n)
    records = []
    with restore_environ():
        os.environ.pop("PL_GLOBAL_SEED", None)
        for devices in (1, 2):
            out = tmp_path / f"{tag}-{devices}"
            out.mkdir()
            kwargs: dict[str, Any] = dict(
                max_epochs=epochs, callbacks=[make_strategy(), RecordState(str(out))]
            )
            if devices == 1:
                sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
                trainer(**kwargs).fit(model(), DataLoader(ds, batch_size=2 * batch_size, sampler=sampler))
                records.append(load_record(str(out)))
            else:
                trainer(strategy="ddp_spawn", devices=2, **kwargs).fit(
                    model(), DataLoader(ds, batch_size=batch_size)
                )
                records += [load_record(str(out), 0), load_record(str(out), 1)]
    single, rank0, rank1 = records
    return single, rank0, rank1
