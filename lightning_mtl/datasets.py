"""Built-in multi-task data sets (no download) and a small MLP to fit them: what ``lightning-mtl compare`` runs.

* ``"digits"``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, on disk with scikit-learn) turned
  into three tasks of different kinds and loss scales: ``digit`` (10-way classification, cross-entropy,
  accuracy), ``parity`` (even/odd, binary cross-entropy, accuracy) and ``value`` (the digit's value as a
  regression target, MSE, mean absolute error).
* ``"synthetic"``: a seeded regression/classification problem with one shared latent factor and tasks of very
  different scales and noise levels: ``low`` (scale 1, noise 0.1), ``high`` (scale 10, noise 1),
  ``noisy`` (scale 1, noise 1.5) and ``sign`` (binary classification of a latent direction). Loss-weighting
  methods matter here: with equal weights the ``high`` task dominates the shared gradient.

Every data set is deterministic (fixed generation and split seeds), so runs differ only by the training seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.module import MultiTaskModule
from lightning_mtl.task import Task

__all__ = [
    "DATASETS",
    "ArchitectureMultiTask",
    "BuiltinDataModule",
    "MLPMultiTask",
    "MultiTaskData",
    "TaskSpec",
    "load_dataset",
    "spec_losses",
]

TaskType = Literal["regression", "binary", "multiclass"]


@dataclass(frozen=True)
class TaskSpec:
    """One task of a built-in data set: its column in the target matrix, its type and its metric."""

    name: str
    type: TaskType
    num_classes: int = 1

    @property
    def out_dim(self) -> int:
        return self.num_classes if self.type == "multiclass" else 1

    def task(self) -> Task:
        """The :class:`~lightning_mtl.Task` with its metric (accuracy for classification, MAE for regression)."""
        from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy
        from torchmetrics.regression import MeanAbsoluteError

        if self.type == "multiclass":
            return Task(
                self.name, kind="classification", metrics={"acc": MulticlassAccuracy(self.num_classes)}
            )
        if self.type == "binary":
            return Task(self.name, kind="classification", metrics={"acc": BinaryAccuracy()})
        return Task(self.name, kind="regression", metrics={"mae": MeanAbsoluteError()})


@dataclass(frozen=True)
class MultiTaskData:
    """A built-in data set: inputs ``x [N, D]`` and targets ``y [N, T_all]`` (class labels stored as floats)."""

    name: str
    tasks: tuple[TaskSpec, ...]
    train: TensorDataset
    val: TensorDataset

    @property
    def in_dim(self) -> int:
        return int(self.train.tensors[0].shape[1])

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)


def _split(x: Tensor, y: Tensor, val_fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(x) * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    # standardise with training statistics; constant columns (digits' blank border pixels) are only centred
    mean, std = x[train].mean(0), x[train].std(0)
    std = torch.where(std > 1e-3, std, torch.ones_like(std))
    x = (x - mean) / std
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def _digits() -> MultiTaskData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    digit = torch.tensor(bunch.target, dtype=torch.float32)
    y = torch.stack([digit, (digit % 2 == 1).float(), digit], dim=1)
    tasks = (
        TaskSpec("digit", "multiclass", 10),
        TaskSpec("parity", "binary"),
        TaskSpec("value", "regression"),
    )
    train, val = _split(x, y, 0.2, seed=0)
    return MultiTaskData("digits", tasks, train, val)


def _synthetic(n: int = 2400, in_dim: int = 16, latent: int = 8) -> MultiTaskData:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, in_dim, generator=g)
    z = torch.tanh(x @ torch.randn(in_dim, latent, generator=g) / in_dim**0.5 * 2)
    heads = torch.randn(latent, 4, generator=g) / latent**0.5
    signal = z @ heads  # [n, 4], one direction of the shared latent per task
    noise = torch.randn(n, 3, generator=g)
    y = torch.stack(
        [
            signal[:, 0] + 0.1 * noise[:, 0],  # low: scale 1, little noise
            10.0 * signal[:, 1] + 1.0 * noise[:, 1],  # high: scale 10
            signal[:, 2] + 1.5 * noise[:, 2],  # noisy: mostly noise
            (signal[:, 3] > 0).float(),  # sign: binary classification
        ],
        dim=1,
    )
    tasks = (
        TaskSpec("low", "regression"),
        TaskSpec("high", "regression"),
        TaskSpec("noisy", "regression"),
        TaskSpec("sign", "binary"),
    )
    train, val = _split(x, y, 0.25, seed=0)
    return MultiTaskData("synthetic", tasks, train, val)


#: the built-in data sets by name
DATASETS = {"digits": _digits, "synthetic": _synthetic}
_CACHE: dict[str, MultiTaskData] = {}


def load_dataset(name: str = "digits") -> MultiTaskData:
    """Load (or generate) a built-in data set by name: ``"digits"`` or ``"synthetic"``."""
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; built-in data sets: {sorted(DATASETS)}.")
    if name not in _CACHE:
        _CACHE[name] = DATASETS[name]()
    return _CACHE[name]


def select_tasks(data: MultiTaskData, tasks: Sequence[str] | None) -> tuple[TaskSpec, ...]:
    """The specs of ``tasks`` (all of the data set's tasks when ``None``), validated."""
    if tasks is None:
        return data.tasks
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of task names, got the string {tasks!r}; e.g. [{tasks!r}].")
    by_name = {t.name: t for t in data.tasks}
    unknown = [t for t in tasks if t not in by_name]
    if unknown or not tasks:
        raise ValueError(
            f"Data set {data.name!r} has tasks {list(by_name)}; got {list(tasks)}"
            + (f" (unknown: {unknown})." if unknown else " (empty).")
        )
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks {list(tasks)} lists a task twice.")
    return tuple(by_name[t] for t in tasks)


class MLPMultiTask(MultiTaskModule):
    """Hard parameter sharing on a built-in data set: a shared MLP encoder and one linear head per task.

    Losses: cross-entropy (multi-class), binary cross-entropy with logits (binary), MSE (regression). Metrics:
    accuracy / mean absolute error per task, logged as ``<stage>/<task>/acc`` or ``<stage>/<task>/mae``.

    Args:
        dataset: ``"digits"`` or ``"synthetic"`` (see :mod:`lightning_mtl.datasets`).
        tasks: which of the data set's tasks to learn (default: all); a single task gives a single-task
            baseline.
        hidden: width of the encoder's layers.
        depth: number of hidden layers of the encoder.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(
        self,
        dataset: str = "digits",
        tasks: list[str] | None = None,
        hidden: int = 64,
        depth: int = 2,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        data = load_dataset(dataset)
        specs = select_tasks(data, tasks)
        super().__init__(tasks=[s.task() for s in specs])
        self.save_hyperparameters()
        if hidden < 1 or depth < 1:
            raise ValueError(
                f"MLPMultiTask: hidden and depth must be >= 1, got hidden={hidden}, depth={depth}."
            )
        self.specs = specs
        self.columns = [data.task_names.index(s.name) for s in specs]
        layers: list[nn.Module] = []
        width = data.in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({s.name: nn.Linear(hidden, s.out_dim) for s in specs})
        self.lr, self.weight_decay = lr, weight_decay

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        mark = getattr(self, "shared_representation", None)  # lets representation-mode strategies find z
        if mark is not None:
            z = mark(z)
        return spec_losses(self.specs, self.columns, {s.name: self.heads[s.name](z) for s in self.specs}, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def spec_losses(
    specs: Sequence[TaskSpec], columns: Sequence[int], outputs: Mapping[str, Tensor], y: Tensor
) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """The losses and metric outputs of a built-in data set's tasks from the model's raw outputs ``{task: [B, out]}``:
    cross-entropy (multi-class), binary cross-entropy with logits (binary), MSE (regression)."""
    losses, pairs = {}, {}
    for spec, column in zip(specs, columns):
        out = outputs[spec.name]
        target = y[:, column]
        if spec.type == "multiclass":
            labels = target.long()
            losses[spec.name] = nn.functional.cross_entropy(out, labels)
            pairs[spec.name] = (out, labels)
        elif spec.type == "binary":
            logit = out.squeeze(1)
            losses[spec.name] = nn.functional.binary_cross_entropy_with_logits(logit, target)
            pairs[spec.name] = (torch.sigmoid(logit), target.long())
        else:
            pred = out.squeeze(1)
            losses[spec.name] = nn.functional.mse_loss(pred, target)
            pairs[spec.name] = (pred, target)
    return losses, pairs


class ArchitectureMultiTask(MultiTaskModule):
    """An architecture of :mod:`lightning_mtl.nn` on a built-in data set, with no ``shared_parameters()`` written:
    the architecture declares them. Losses and metrics as :class:`MLPMultiTask`; DSelect-k's regulariser
    (``aux_losses``) is added to each task's loss.

    Args:
        dataset: ``"digits"`` or ``"synthetic"``.
        arch: an architecture name (:data:`lightning_mtl.nn.ARCHITECTURES`: ``HardSharing``, ``MMoE``, ...).
        tasks: which of the data set's tasks to learn (default: all).
        hidden: hidden width of the architecture (see :func:`lightning_mtl.nn.build_architecture`).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(
        self,
        dataset: str = "digits",
        arch: str = "HardSharing",
        tasks: list[str] | None = None,
        hidden: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        from lightning_mtl.nn import build_architecture

        data = load_dataset(dataset)
        specs = select_tasks(data, tasks)
        super().__init__(tasks=[s.task() for s in specs])
        self.save_hyperparameters()
        self.specs = specs
        self.columns = [data.task_names.index(s.name) for s in specs]
        self.model = build_architecture(
            arch, self.task_names, data.in_dim, {s.name: s.out_dim for s in specs}, hidden
        )
        self.lr, self.weight_decay = lr, weight_decay

    def task_losses(self, batch, batch_idx):
        x, y = batch
        losses, pairs = spec_losses(self.specs, self.columns, self.model(x), y)
        regulariser = getattr(self.model, "aux_losses", None)  # DSelect-k: one term per task, in the graph
        if regulariser:
            losses = {t: loss + regulariser[t] for t, loss in losses.items()}
        return losses, pairs

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class BuiltinDataModule(pl.LightningDataModule):
    """Loaders of a built-in data set (the inputs of every task; the model picks its tasks' targets).

    Args:
        dataset: ``"digits"`` or ``"synthetic"``.
        batch_size: training and validation batch size.
    """

    def __init__(self, dataset: str = "digits", batch_size: int = 64) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"BuiltinDataModule: batch_size must be >= 1, got {batch_size}.")
        self.data = load_dataset(dataset)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data.val, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
