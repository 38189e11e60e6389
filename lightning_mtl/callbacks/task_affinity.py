"""Lookahead inter-task affinity (Fifty et al. 2021): how a step on task i changes the loss of task j."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_mtl._lightning import silenced_logging
from lightning_mtl.callbacks._report import (
    SharedGradientProbe,
    check_every_n_steps,
    log_heatmap,
    log_scalars,
    matrix_table,
    print_rich,
)
from lightning_mtl.step import StepContext
from lightning_mtl.task import auxiliary_task_names, main_task_names
from lightning_mtl.task_state import take_tasks, task_order


def lookahead_affinity(base_losses: Tensor, lookahead_losses: Tensor) -> Tensor:
    """``Z[i, j] = 1 − Lⱼ(θ after a step on task i) / Lⱼ(θ)`` from ``base_losses [T]`` and
    ``lookahead_losses [T, T]`` (row i: every task's loss after the step on task i).

    Positive: the step on task i lowered task j's loss (i helps j); negative: it raised it.
    """
    return 1.0 - lookahead_losses / base_losses[None, :]


class TaskAffinity(SharedGradientProbe):
    """Lookahead inter-task affinity: Fifty, Amid, Zhao, Yu, Anil & Finn, "Efficiently Identifying Task
    Groupings for Multi-Task Learning", NeurIPS 2021 (https://arxiv.org/abs/2109.04617), eq. 3.

    Every ``every_n_steps`` optimizer steps, on the step's batch and before the strategy's backward: compute
    each task's gradient ``gᵢ`` on the shared parameters (one batched ``autograd.grad`` on the step's graph,
    averaged over ranks), take an SGD step on task i alone, ``θ'ᵢ = θ − lr·gᵢ`` (shared parameters only; the
    task heads stay), and measure every task's loss there::

        Z[i → j] = 1 − Lⱼ(θ'ᵢ) / Lⱼ(θ)

    ``Z[i → j] > 0``: a step on task i helps task j. The matrix is averaged over the measurements of the whole
    fit (:attr:`affinity`, in the checkpoint) — the paper's quantity for grouping tasks, and a guide for
    choosing auxiliary tasks (keep the auxiliaries with high ``Z[aux → main]``).

    The lookahead losses need ``T + 1`` extra forward passes (no backward) on measured steps; other steps
    cost one integer test. The real optimizer and its state are untouched; parameters are restored bit for
    bit, buffers (e.g. BatchNorm statistics) are restored, and the RNG state is forked so that dropout draws
    the same masks in the ``T + 1`` forwards and training draws the same numbers as without the callback.
    Under DDP every rank uses the rank-averaged gradients and the losses are averaged over ranks before the
    ratio (``Lⱼ`` on the global batch).

    Logged: ``affinity/<task_i>/<task_j>`` (this measurement's ``Z[i → j]``, including ``i = j``) every measured
    step, and the running mean as a heat map (``affinity/heatmap``) at each training epoch end.

    **Auxiliary tasks** (``Task(name, role="auxiliary")``): the question is then which auxiliary steps help the
    main tasks, so the printed table and :meth:`auxiliary_table` report ``Z[aux → main]`` (rows: auxiliary
    tasks, columns: main tasks); the full matrix stays in :attr:`affinity`, :meth:`table` and the heat map.

    Args:
        every_n_steps: measure on every n-th optimizer step (default 10).
        lr: lookahead learning rate; ``None`` (default) uses the first optimizer's current learning rate
            (first parameter group).
        log_heatmap: add the mean affinity matrix to TensorBoard as an image each epoch (default ``True``).
        print_table: print the mean affinity matrix as a table at the end of fit (rank 0; default ``False``).
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        lr: float | None = None,
        log_heatmap: bool = True,
        print_table: bool = False,
    ) -> None:
        self.every_n_steps = check_every_n_steps("TaskAffinity", every_n_steps)
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"TaskAffinity: lr must be a number > 0 or None (optimizer's lr), got {lr!r}.")
        self.lr = None if lr is None else float(lr)
        self.log_heatmap = bool(log_heatmap)
        self.print_table = bool(print_table)
        super().__init__()

    def reset(self) -> None:
        #: the module's main and auxiliary tasks (set at the first measurement)
        self.main_tasks: tuple[str, ...] = ()
        self.auxiliary_tasks: tuple[str, ...] = ()
        self._sum: Tensor | None = None
        self._count = 0
        #: the last measurement ``Z`` ``[T, T]``
        self.last: Tensor | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, lr=self.lr)

    @property
    def affinity(self) -> Tensor | None:
        """Mean ``Z[i → j]`` ``[T, T]`` over every measurement so far (``None`` before the first)."""
        return None if self._sum is None else self._sum / self._count

    def table(self) -> dict[str, dict[str, float]]:
        """The mean affinity as ``{source task i: {target task j: Z[i → j]}}``."""
        mean = self.affinity
        if mean is None:
            return {}
        rows = mean.tolist()
        return {a: dict(zip(self.task_names, row)) for a, row in zip(self.task_names, rows)}

    def auxiliary_table(self) -> dict[str, dict[str, float]]:
        """The mean affinity from each auxiliary task to each main task, ``{aux: {main: Z[aux → main]}}``
        (``{}`` without auxiliary tasks or before the first measurement)."""
        full = self.table()
        return {a: {m: full[a][m] for m in self.main_tasks} for a in self.auxiliary_tasks if a in full}

    # ------------------------------------------------------------------ the measurement
    def _lookahead_lr(self, trainer: pl.Trainer) -> float:
        if self.lr is not None:
            return self.lr
        if not trainer.optimizers:
            raise RuntimeError(
                "TaskAffinity(lr=None) reads the optimizer's lr, but the Trainer has no optimizer."
            )
        return float(trainer.optimizers[0].param_groups[0]["lr"])

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, ctx: StepContext
    ) -> None:
        from lightning_mtl.gradients import unflatten
        from lightning_mtl.step import reduce_mean

        tasks = getattr(pl_module, "tasks", self.task_names)
        self.main_tasks, self.auxiliary_tasks = main_task_names(tasks), auxiliary_task_names(tasks)
        J = self.shared_jacobian(trainer, ctx)
        params = self._params
        assert params is not None
        lr = self._lookahead_lr(trainer)
        T = J.shape[0]
        saved = [p.detach().clone() for p in params]
        buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
        rows = []
        with ExitStack() as stack:
            devices = [pl_module.device] if pl_module.device.type == "cuda" else []
            stack.enter_context(torch.random.fork_rng(devices=devices))
            rng = torch.get_rng_state()
            cuda_rng = [torch.cuda.get_rng_state(d) for d in devices]
            stack.enter_context(torch.no_grad())
            stack.enter_context(silenced_logging(pl_module))
            try:
                rows.append(self._losses_at(pl_module, batch, batch_idx, rng, devices, cuda_rng))
                for i in range(T):
                    for p, p0, g in zip(params, saved, unflatten(J[i], params)):
                        # .data: no version-counter bump, the step's graph (which saved θ) stays valid
                        p.data.copy_(p0 - lr * g.to(p0.dtype))
                    rows.append(self._losses_at(pl_module, batch, batch_idx, rng, devices, cuda_rng))
            finally:
                for p, p0 in zip(params, saved):
                    p.data.copy_(p0)
                for b, b0 in buffers:
                    b.data.copy_(b0)
                torch.clear_autocast_cache()
        stacked = reduce_mean(trainer, torch.stack(rows))  # [T + 1, T]: L(θ), then L(θ'ᵢ) for each i
        Z = lookahead_affinity(stacked[0], stacked[1:]).detach().cpu().float()
        self.last = Z
        self._sum = Z.clone() if self._sum is None else self._sum + Z
        self._count += 1
        names = self.task_names
        values = Z.tolist()
        log_scalars(
            trainer,
            {f"affinity/{names[i]}/{names[j]}": values[i][j] for i in range(T) for j in range(T)},
        )

    @staticmethod
    def _losses_at(
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        rng: Tensor,
        devices: list[Any],
        cuda_rng: list[Tensor],
    ) -> Tensor:
        from lightning_mtl.metrics import split_task_output

        torch.set_rng_state(rng)
        for d, state in zip(devices, cuda_rng):
            torch.cuda.set_rng_state(state, d)
        torch.clear_autocast_cache()  # autocast caches casts of the weights: drop the stale ones
        losses, _ = split_task_output(pl_module.task_losses(batch, batch_idx))
        return torch.stack([losses[n].detach().float() for n in pl_module.task_names])

    # ------------------------------------------------------------------ reporting
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mean = self.affinity
        if self.log_heatmap and mean is not None:
            bound = max(float(mean.abs().max()), 1e-6)
            log_heatmap(
                trainer,
                "affinity/heatmap",
                mean,
                self.task_names,
                f"lookahead affinity Z[row → column] (mean of {self._count})",
                -bound,
                bound,
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mean = self.affinity
        if self.print_table and mean is not None and trainer.global_rank == 0 and self.auxiliary_tasks:
            index = {n: i for i, n in enumerate(self.task_names)}
            aux = [index[n] for n in self.auxiliary_tasks]
            main = [index[n] for n in self.main_tasks]
            print_rich(
                matrix_table(
                    mean[aux][:, main],
                    self.auxiliary_tasks,
                    f"auxiliary → main affinity Z[aux → main] = 1 − L_main(after a step on aux) / L_main "
                    f"({self._count} measurements)",
                    "step on aux ↓ / main loss →",
                    columns=self.main_tasks,
                )
            )
        elif self.print_table and mean is not None and trainer.global_rank == 0:
            print_rich(
                matrix_table(
                    mean,
                    self.task_names,
                    f"task affinity Z[i → j] = 1 − Lⱼ(after a step on i) / Lⱼ ({self._count} measurements)",
                    "step on ↓ / loss of →",
                )
            )

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"task_names": list(self.task_names), "sum": self._sum, "count": self._count}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore by task name: the module's tasks may be in another order, not another set."""
        saved = tuple(state_dict["task_names"])
        total = state_dict["sum"]
        if self.task_names:  # set up for fit: the running sum follows the module's task order
            order = task_order(type(self).__name__, saved, self.task_names)
            total = None if total is None else take_tasks(total, order, (0, 1))
        else:  # not set up for fit (e.g. validate(ckpt_path=...)): keep the saved order
            self.task_names = saved
        self._sum = total
        self._count = int(state_dict["count"])
