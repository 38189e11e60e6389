"""A table of the tasks at the end of fit: weights, last losses, metrics, Δm%."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_mtl.task import main_task_names


class MTLSummary(Callback):
    """Prints a ``rich`` table of the tasks when ``fit`` ends (rank 0): the strategy's final weight of each
    task, the last logged training and validation losses (``train/loss/<task>``, ``val/loss/<task>``), the
    last validation metrics (``val/<task>/<metric>``) and, when a :class:`~lightning_mtl.callbacks.DeltaM`
    callback logged it, ``val/delta_m``. Values not logged during the fit show as ``-``.

    The same content is available as :attr:`rows` / :attr:`delta_m` and as Markdown (:meth:`to_markdown`).

    The rows are the **main** tasks, the results. Auxiliary tasks (``Task(name, role="auxiliary")``) are trained
    but are not results: they follow in a separate section, marked ``(auxiliary)``, with their weight and losses
    only (:attr:`auxiliary_rows`), and Δm% covers the main tasks only (:class:`~lightning_mtl.callbacks.DeltaM`).

    Args:
        print_table: print the table (default ``True``); ``False`` only collects :attr:`rows`.
    """

    def __init__(self, print_table: bool = True) -> None:
        super().__init__()
        self.print_table = bool(print_table)
        #: one dict per task: ``task``, ``weight``, ``train_loss``, ``val_loss``, ``metrics`` (name -> value)
        self.rows: list[dict[str, Any]] = []
        #: the auxiliary tasks' rows (same keys; ``metrics`` empty: they are not results)
        self.auxiliary_rows: list[dict[str, Any]] = []
        self.delta_m: float | None = None
        self.strategy_name: str = ""

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = tuple(getattr(pl_module, "task_names", ()))
        if not names:
            return
        logged = {k: _to_float(v) for k, v in trainer.callback_metrics.items()}
        strategy = getattr(pl_module, "strategy", None)
        weights = strategy.weights if strategy is not None else None
        self.strategy_name = type(strategy).__name__ if strategy is not None else ""
        main = set(main_task_names(getattr(pl_module, "tasks", names)))
        self.rows, self.auxiliary_rows = [], []
        for name in names:
            prefix = f"val/{name}/"
            row = {
                "task": name,
                "weight": None if weights is None else weights.get(name),
                "train_loss": logged.get(f"train/loss/{name}"),
                "val_loss": logged.get(f"val/loss/{name}"),
                "metrics": {k[len(prefix) :]: v for k, v in logged.items() if k.startswith(prefix)},
            }
            if name in main:
                self.rows.append(row)
            else:
                self.auxiliary_rows.append({**row, "metrics": {}})
        self.delta_m = logged.get("val/delta_m")
        if self.print_table and trainer.global_rank == 0:
            from rich.console import Console

            Console().print(self.rich_table())

    def _columns(self) -> list[tuple[str, str]]:
        return [
            ("task", "task"),
            ("weight", "weight"),
            ("train_loss", "train loss"),
            ("val_loss", "val loss"),
        ]

    def rich_table(self) -> Any:
        from rich.table import Table

        title = (
            f"lightning-mtl summary ({self.strategy_name})" if self.strategy_name else "lightning-mtl summary"
        )
        caption = None if self.delta_m is None else f"Δm% = {self.delta_m:+.2f} (lower is better)"
        table = Table(title=title, caption=caption)
        for _, header in self._columns():
            table.add_column(header, justify="left" if header == "task" else "right")
        table.add_column("val metrics", justify="left")
        for row in self.rows:
            table.add_row(*self._cells(row))
        if self.auxiliary_rows:
            table.add_section()
            for row in self.auxiliary_rows:
                table.add_row(*self._cells(row, auxiliary=True))
        return table

    def _cells(self, row: dict[str, Any], auxiliary: bool = False) -> list[str]:
        task = f"{row['task']} (auxiliary)" if auxiliary else row["task"]
        cells = [task] + [_fmt(row[key]) for key, _ in self._columns()[1:]]
        cells.append(", ".join(f"{k}={_fmt(v)}" for k, v in sorted(row["metrics"].items())) or "-")
        return cells

    def to_markdown(self) -> str:
        """The summary as a Markdown table (plus the Δm% line when available)."""
        headers = [h for _, h in self._columns()] + ["val metrics"]
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(self._cells(row)) + " |" for row in self.rows]
        lines += ["| " + " | ".join(self._cells(row, auxiliary=True)) + " |" for row in self.auxiliary_rows]
        if self.delta_m is not None:
            lines.append(f"\nΔm% = {self.delta_m:+.2f} (lower is better)")
        return "\n".join(lines)


def _to_float(value: Any) -> float:
    return float(value.detach().cpu()) if isinstance(value, Tensor) else float(value)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"
