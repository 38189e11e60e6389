"""What ``lightning-mtl compare`` writes at the end: ``results.csv``, ``results.md``, the console table and the
``weights.png`` / ``losses.png`` plots."""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_mtl.cli.recording import RunRecord


def metric_keys(record: RunRecord, tasks: Sequence[str]) -> list[str]:
    """``<task>/<metric>`` keys of the validation metrics a run logged, in task order."""
    keys = []
    for task in tasks:
        prefix = f"val/{task}/"
        keys += sorted(k[4:] for k in record.metrics if k.startswith(prefix))
    return keys


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_tables(
    out: Path,
    records: list[RunRecord],
    tasks: Sequence[str],
    directions: dict[str, bool],
    baselines: dict[str, float] | None,
    settings: str,
) -> tuple[list[str], list[list[str]]]:
    """Writes ``results.csv`` and ``results.md`` (``settings`` describes the runs); returns the Markdown table's
    titles and cells."""
    keys = metric_keys(records[0], tasks) if records else []
    loss_keys = [f"{t}/loss" for t in tasks]
    header = ["strategy", *keys, *loss_keys, "delta_m", "ms_per_step", "peak_mem_mb", "seconds"]
    rows = []
    for rec in records:
        row = {"strategy": rec.name}
        row.update({k: rec.metrics.get(f"val/{k}") for k in keys})
        row.update({f"{t}/loss": rec.metrics.get(f"val/loss/{t}") for t in tasks})
        row.update(
            delta_m=rec.delta_m, ms_per_step=rec.ms_per_step, peak_mem_mb=rec.peak_mem_mb, seconds=rec.seconds
        )
        rows.append(row)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})

    def arrow(key: str) -> str:
        return " ↑" if directions.get(key) else " ↓"

    titles = ["strategy"] + [k + arrow(k) for k in keys + loss_keys] + ["Δm% ↓", "ms/step", "peak mem (MB)"]
    lines = [
        "# lightning-mtl compare",
        "",
        f"{settings}. Validation metrics and losses after the last epoch (↑ higher is better, ↓ lower is better).",
        "",
        "| " + " | ".join(titles) + " |",
        "|" + "---|" * len(titles),
    ]
    table_rows = []
    for row in rows:
        cells = [row["strategy"]] + [_fmt(row[k]) for k in keys + loss_keys]
        cells += [f"{row['delta_m']:+.2f}" if row["delta_m"] is not None else "", _fmt(row["ms_per_step"], 3)]
        cells.append(_fmt(row["peak_mem_mb"], 3))
        table_rows.append(cells)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if baselines:
        base = ", ".join(f"{k} = {_fmt(v)}" for k, v in baselines.items())
        lines.append(
            "Δm% (Maninis et al. 2019): mean over the metrics of every task of the relative change against the "
            "single-task baselines, sign-corrected so that **lower is better** and negative means better than "
            f"single-task training. Baselines: {base}."
        )
    else:
        lines.append("Δm%: no single-task baselines (pass --baselines train or a JSON file).")
    lines.append(
        "ms/step: mean wall time of a training step (after 3 warm-up steps). peak mem: on GPU the peak memory "
        "allocated by torch; on CPU the peak growth of the process's resident memory during the fit."
    )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return titles, table_rows


def print_table(console: Any, titles: list[str], cells: list[list[str]]) -> None:
    """The results table on the console (the per-task losses stay in the files)."""
    from rich.table import Table

    table = Table(title="validation after the last epoch", caption="↑ higher is better, ↓ lower is better")
    keep = [i for i, title in enumerate(titles) if not title.endswith("/loss ↓")]
    for i in keep:
        table.add_column(titles[i], justify="left" if i == 0 else "right")
    for row in cells:
        table.add_row(*(row[i] for i in keep))
    console.print(table)


def write_plots(out: Path, records: list[RunRecord], tasks: Sequence[str]) -> list[Path]:
    """Writes ``weights.png`` (one panel per strategy) and ``losses.png`` (one panel per task); returns their
    paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no weights.png / losses.png (pip install matplotlib).")
        return []
    n = max(1, len(records))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharex=True)
    for ax, rec in zip(axes.flat, records):
        ax.set_title(rec.name, fontsize=9)
        if rec.weights:
            for task, values in zip(tasks, zip(*rec.weights)):
                ax.plot(rec.weight_steps, values, label=task, lw=1)
        else:
            ax.text(0.5, 0.5, "no per-task weights", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(records) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("task weight")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("task weights during training", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=100)
    plt.close(fig)

    cols = min(4, max(1, len(tasks)))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharex=True)
    for k, (ax, task) in enumerate(zip(axes.flat, tasks)):
        for rec in records:
            if rec.losses:
                ax.plot(rec.loss_steps, _ema([row[k] for row in rec.losses]), label=rec.name, lw=1)
        ax.set_title(f"{task}: training loss (EMA 0.9)", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=100)
    plt.close(fig)
    return [out / "weights.png", out / "losses.png"]


def _ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out
