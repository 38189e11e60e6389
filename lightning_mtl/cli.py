"""The ``lightning-mtl`` command.

* ``lightning-mtl compare``: train one model with several strategies on a built-in multi-task data set (or on
  the user's model and data from a LightningCLI YAML config) and write TensorBoard runs, a Markdown/CSV
  results table (per-task metrics, Δm%, time per step, peak memory) and PNG plots of the task weights and
  task losses.
* ``lightning-mtl fit|validate|test --config my.yaml``: Lightning's own ``LightningCLI`` for a
  :class:`~lightning_mtl.MultiTaskModule`, where every strategy and diagnostics callback is configurable
  (``trainer.callbacks: [{class_path: lightning_mtl.strategies.PCGrad, init_args: {...}}]``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_mtl.callbacks import DeltaM
from lightning_mtl.metrics import delta_m

#: loss-based strategies compared by default
DEFAULT_LOSS_BASED = ("EqualWeighting", "UncertaintyWeighting", "DWA", "RLW", "GLS")
#: gradient-based strategies compared by default when :mod:`lightning_mtl.strategies` provides them
DEFAULT_GRADIENT_BASED = ("PCGrad", "MGDA", "CAGrad", "NashMTL", "UPGrad", "GradNorm")


# ============================================================================================ strategies
def available_strategies() -> dict[str, type]:
    """Every concrete strategy class exported by :mod:`lightning_mtl.strategies`, by class name."""
    import inspect

    from lightning_mtl import strategies
    from lightning_mtl.strategies.base import MTLStrategy

    found = {}
    for name in getattr(strategies, "__all__", dir(strategies)):
        obj = getattr(strategies, name, None)
        if not (inspect.isclass(obj) and issubclass(obj, MTLStrategy)) or obj is MTLStrategy:
            continue
        module = obj.__module__.rsplit(".", 1)[-1]
        if module.startswith("_") or module == "base":  # shared bases (LossWeighting, ...), not methods
            continue
        found[name] = obj
    return found


def default_strategies() -> list[str]:
    """The default comparison set: the loss-based methods, then the gradient-based ones that exist."""
    available = available_strategies()
    return [n for n in DEFAULT_LOSS_BASED + DEFAULT_GRADIENT_BASED if n in available]


def resolve_strategy(name: str) -> type:
    """A strategy class from its name: case-insensitive, ``-``/``_`` ignored, ``Weighting`` suffix optional
    (``pcgrad``, ``nash-mtl``, ``uncertainty``)."""
    available = available_strategies()
    key = name.replace("-", "").replace("_", "").lower()
    for cls_name, cls in available.items():
        if key in (cls_name.lower(), cls_name.lower().removesuffix("weighting")):
            return cls
    raise ValueError(f"Unknown strategy {name!r}; available: {', '.join(sorted(available))}.")


def make_strategy(name: str) -> Any:
    cls = resolve_strategy(name)
    try:
        return cls()
    except TypeError as err:
        raise ValueError(
            f"Strategy {cls.__name__} cannot be built with its defaults ({err}); compare it through a LightningCLI "
            "config (lightning-mtl fit --config ...) where its arguments can be given."
        ) from err


# ============================================================================================ recording
@dataclass
class RunRecord:
    """What one training run leaves for the results table and the plots."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    weight_steps: list[int] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    loss_steps: list[int] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    ms_per_step: float = float("nan")
    peak_mem_mb: float = float("nan")
    seconds: float = float("nan")
    delta_m: float | None = None


class _Recorder(Callback):
    """Records the rank-averaged task losses and the strategy's weights every ``every`` steps, the time per
    training step and the peak memory; rank 0 saves them to ``path`` at the end of fit (a file, so that the
    record survives ``ddp_spawn``)."""

    def __init__(self, path: str, every: int = 1, warmup: int = 3) -> None:
        self.path, self.every, self.warmup = path, every, warmup
        self._losses: list[tuple[int, torch.Tensor]] = []
        self._weights: list[tuple[int, torch.Tensor]] = []
        self._t0 = 0.0
        self._step_time = 0.0
        self._timed = 0
        self._seen = 0
        self._rss0 = 0
        self._rss_peak = 0

    def on_fit_start(self, trainer, pl_module):
        self._fit_t0 = time.perf_counter()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._rss0 = self._rss_peak = _rss_bytes()

    def on_task_losses(self, trainer, pl_module, losses, batch, batch_idx, ctx):
        if ctx.is_window_start and trainer.global_step % self.every == 0:
            self._losses.append((trainer.global_step, ctx.global_losses.detach().clone()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._seen += 1
        if self._seen > self.warmup:
            self._step_time += time.perf_counter() - self._t0
            self._timed += 1
        self._rss_peak = max(self._rss_peak, _rss_bytes())
        step = trainer.global_step - 1
        weights = pl_module.strategy.weights_tensor()
        if weights is not None and step % self.every == 0:
            self._weights.append((step, weights.detach().clone()))

    def on_fit_end(self, trainer, pl_module):
        if trainer.global_rank != 0:
            return
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            peak = (self._rss_peak - self._rss0) / 2**20
        record = {
            "weight_steps": [s for s, _ in self._weights],
            "weights": [w.float().cpu().tolist() for _, w in self._weights],
            "loss_steps": [s for s, _ in self._losses],
            "losses": [v.float().cpu().tolist() for _, v in self._losses],
            "ms_per_step": 1000 * self._step_time / self._timed if self._timed else float("nan"),
            "peak_mem_mb": peak,
            "seconds": time.perf_counter() - self._fit_t0,
        }
        Path(self.path).write_text(json.dumps(record))


def _rss_bytes() -> int:
    """Current resident memory of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Progress(Callback):
    """Advances a rich progress bar by one per training batch (single-process runs only)."""

    def __init__(self, progress: Any, task_id: Any) -> None:
        self.progress, self.task_id = progress, task_id

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.progress.advance(self.task_id)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k == "val/loss"}
            if shown:
                self.progress.update(self.task_id, status=f"val/loss {shown['val/loss']:.4g}")


# ============================================================================================ compare
@dataclass
class CompareSetup:
    """How the models and data of a comparison are built: the built-in data sets, or a user's config."""

    make_model: Any  # (tasks or None) -> MultiTaskModule
    make_data: Any  # () -> LightningDataModule
    task_names: tuple[str, ...]
    label: str
    can_train_baselines: bool
    baselines: dict[str, float] | None = None  # from a DeltaM callback in the config


def _builtin_setup(dataset: str, tasks: Sequence[str] | None, batch_size: int) -> CompareSetup:
    from lightning_mtl.datasets import BuiltinDataModule, MLPMultiTask, load_dataset, select_tasks

    specs = select_tasks(load_dataset(dataset), tasks)
    names = tuple(s.name for s in specs)
    return CompareSetup(
        make_model=lambda subset=None: MLPMultiTask(dataset, list(subset or names), lr=3e-3),
        make_data=lambda: BuiltinDataModule(dataset, batch_size=batch_size),
        task_names=names,
        label=f"built-in data set '{dataset}'",
        can_train_baselines=True,
    )


def _config_setup(config: str, tasks: Sequence[str] | None) -> CompareSetup:
    from lightning.pytorch.cli import LightningCLI

    from lightning_mtl.module import MultiTaskModule

    if tasks:
        raise ValueError(
            "--tasks applies to the built-in data sets; with --config the model defines its tasks."
        )

    def parse() -> Any:
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
        return LightningCLI(
            MultiTaskModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=["--config", config, "--trainer.logger=false"],
            run=False,
            save_config_callback=None,
            seed_everything_default=False,
        )

    probe = parse()
    from_config = [cb.baselines for cb in probe.trainer.callbacks if isinstance(cb, DeltaM)]
    return CompareSetup(
        make_model=lambda subset=None: parse().model,
        make_data=lambda: parse().datamodule,
        task_names=tuple(probe.model.task_names),
        label=f"config {config} ({type(probe.model).__name__})",
        can_train_baselines=False,
        baselines=from_config[0] if from_config else None,
    )


def _fit(
    setup: CompareSetup,
    name: str,
    strategy: Any,
    out: Path,
    args: argparse.Namespace,
    baselines: dict[str, float] | None,
    progress: Any,
    subset: Sequence[str] | None = None,
    tb_name: str | None = None,
) -> RunRecord:
    from lightning.pytorch.loggers import TensorBoardLogger

    pl.seed_everything(args.seed, verbose=False)
    model = setup.make_model(subset)
    data = setup.make_data()
    record_path = out / ".records" / f"{tb_name or name}.json"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    callbacks: list[Callback] = [strategy, _Recorder(str(record_path))]
    if baselines:
        callbacks.append(DeltaM(baselines))
    task_id = None
    if progress is not None and args.devices == 1:
        data.setup("fit")
        steps = args.epochs * len(data.train_dataloader())
        task_id = progress.add_task(name, total=steps, status="")
        callbacks.append(_Progress(progress, task_id))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp_spawn" if args.devices > 1 else "auto",
        logger=TensorBoardLogger(str(out / "tb"), name=tb_name or name, version="", default_hp_metric=False),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=args.log_every_n_steps,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    trainer.fit(model, datamodule=data)
    record = RunRecord(name=name, metrics={k: float(v) for k, v in trainer.callback_metrics.items()})
    saved = json.loads(record_path.read_text())
    for key in ("weight_steps", "weights", "loss_steps", "losses", "ms_per_step", "peak_mem_mb", "seconds"):
        setattr(record, key, saved[key])
    record.delta_m = record.metrics.get("val/delta_m")
    if task_id is not None:
        dm = f", Δm% {record.delta_m:+.2f}" if record.delta_m is not None else ""
        progress.update(task_id, status=f"{record.ms_per_step:.1f} ms/step{dm}")
    return record


def _metric_keys(record: RunRecord, tasks: Sequence[str]) -> list[str]:
    """``<task>/<metric>`` keys of the validation metrics a run logged, in task order."""
    keys = []
    for task in tasks:
        prefix = f"val/{task}/"
        keys += sorted(k[4:] for k in record.metrics if k.startswith(prefix))
    return keys


def _directions(setup_model: Any) -> dict[str, bool]:
    tm = getattr(setup_model, "task_metrics", None)
    directions = dict(tm.higher_is_better) if tm is not None else {}
    directions.update({f"{n}/loss": False for n in setup_model.task_names})
    return directions


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison described by ``args`` (see ``lightning-mtl compare --help``); returns a summary."""
    _quiet_lightning()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    setup = (
        _config_setup(args.config, tasks)
        if args.config
        else _builtin_setup(args.dataset, tasks, args.batch_size)
    )
    names = [s for s in args.strategies.split(",") if s] if args.strategies else default_strategies()
    strategies = [(resolve_strategy(n).__name__, n) for n in names]
    if len({n for n, _ in strategies}) != len(strategies):
        raise ValueError(f"--strategies lists a strategy twice: {names}.")
    directions = _directions(setup.make_model(None))

    console.print(
        f"[bold]lightning-mtl compare[/bold]: {len(strategies)} strategies on {setup.label}, tasks "
        f"{list(setup.task_names)}, {args.epochs} epochs, seed {args.seed} -> {out}/"
    )
    records: list[RunRecord] = []
    baselines: dict[str, float] | None = None
    columns = [
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=console, disable=args.quiet) as progress:
        # single-task baselines for Δm%
        if args.baselines == "train" and setup.can_train_baselines and len(setup.task_names) > 1:
            from lightning_mtl.strategies import EqualWeighting

            baselines = {}
            for task in setup.task_names:
                rec = _fit(
                    setup,
                    f"single-task {task}",
                    EqualWeighting(),
                    out,
                    args,
                    None,
                    progress,
                    [task],
                    tb_name=f"single_task/{task}",
                )
                for key in _metric_keys(rec, [task]):
                    baselines[key] = rec.metrics[f"val/{key}"]
            (out / "baselines.json").write_text(json.dumps(baselines, indent=2))
        elif args.baselines not in ("train", "none"):
            baselines = {k: float(v) for k, v in json.loads(Path(args.baselines).read_text()).items()}
        elif args.baselines == "train" and setup.baselines:
            baselines = dict(setup.baselines)
        baselines = {k: v for k, v in (baselines or {}).items() if v != 0} or None
        for display, name in strategies:
            records.append(_fit(setup, display, make_strategy(name), out, args, baselines, progress))

    metric_keys = _metric_keys(records[0], setup.task_names) if records else []
    for rec in records:
        if rec.delta_m is None and baselines:
            values = {k: rec.metrics.get(f"val/{k}", math.nan) for k in baselines}
            rec.delta_m = delta_m(values, baselines, {k: directions.get(k, False) for k in baselines})
    titles, cells = _write_tables(out, records, metric_keys, directions, baselines, setup, args)
    plots = _write_plots(out, records, setup.task_names)
    if not args.quiet:
        from rich.table import Table

        table = Table(
            title="validation after the last epoch", caption="↑ higher is better, ↓ lower is better"
        )
        keep = [i for i, title in enumerate(titles) if not title.endswith("/loss ↓")]  # losses: files only
        for i in keep:
            table.add_column(titles[i], justify="left" if i == 0 else "right")
        for row in cells:
            table.add_row(*(row[i] for i in keep))
        console.print(table)
    console.print(f"wrote {out}/results.md, {out}/results.csv{plots}, TensorBoard runs in {out}/tb/")
    return {"records": records, "baselines": baselines, "metric_keys": metric_keys}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _write_tables(
    out: Path,
    records: list[RunRecord],
    metric_keys: list[str],
    directions: dict[str, bool],
    baselines: dict[str, float] | None,
    setup: CompareSetup,
    args: argparse.Namespace,
) -> tuple[list[str], list[list[str]]]:
    loss_keys = [f"{t}/loss" for t in setup.task_names]
    header = ["strategy", *metric_keys, *loss_keys, "delta_m", "ms_per_step", "peak_mem_mb", "seconds"]
    rows = []
    for rec in records:
        row = {"strategy": rec.name}
        row.update({k: rec.metrics.get(f"val/{k}") for k in metric_keys})
        row.update({f"{t}/loss": rec.metrics.get(f"val/loss/{t}") for t in setup.task_names})
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

    titles = (
        ["strategy"] + [k + arrow(k) for k in metric_keys + loss_keys] + ["Δm% ↓", "ms/step", "peak mem (MB)"]
    )
    lines = [
        "# lightning-mtl compare",
        "",
        f"{setup.label}; tasks {', '.join(setup.task_names)}; {args.epochs} epochs; seed {args.seed}; "
        f"devices {args.devices}. Validation metrics and losses after the last epoch (↑ higher is better, "
        "↓ lower is better).",
        "",
        "| " + " | ".join(titles) + " |",
        "|" + "---|" * len(titles),
    ]
    table_rows = []
    for row in rows:
        cells = [row["strategy"]] + [_fmt(row[k]) for k in metric_keys + loss_keys]
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


def _write_plots(out: Path, records: list[RunRecord], tasks: Sequence[str]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no weights.png / losses.png (pip install matplotlib).")
        return ""
    n = max(1, len(records))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharex=True)
    for ax, rec in zip(axes.flat, records):
        ax.set_title(rec.name, fontsize=9)
        if rec.weights:
            series = list(zip(*rec.weights))
            for task, values in zip(tasks, series):
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
    return f", {out}/weights.png, {out}/losses.png"


def _ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


# ============================================================================================ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-mtl",
        description="Multi-task learning for PyTorch Lightning: compare strategies, or run a LightningCLI config.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compare",
        help="train one model with several strategies and write tables and plots",
        description="Train one multi-task model with several strategies; write TensorBoard runs (tb/<strategy>/), "
        "results.md / results.csv (per-task metrics, Δm%%, time per step, peak memory), weights.png and losses.png.",
    )
    c.add_argument(
        "--strategies",
        default="",
        help=f"comma-separated strategy names, case-insensitive, 'Weighting' suffix optional (default: those "
        f"available of {', '.join(DEFAULT_LOSS_BASED + DEFAULT_GRADIENT_BASED)})",
    )
    c.add_argument(
        "--dataset", default="digits", help="built-in data set: digits or synthetic (default: digits)"
    )
    c.add_argument(
        "--tasks", default="", help="comma-separated subset of the data set's tasks (default: all)"
    )
    c.add_argument("--epochs", type=int, default=5, help="training epochs per run (default: 5)")
    c.add_argument("--devices", type=int, default=1, help="devices per run; > 1 uses ddp_spawn (default: 1)")
    c.add_argument("--accelerator", default="auto", help="cpu, gpu, auto (default: auto)")
    c.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    c.add_argument("--batch-size", type=int, default=64, help="batch size (built-in data; default: 64)")
    c.add_argument("--out", default="mtl_compare", help="output directory (default: mtl_compare)")
    c.add_argument(
        "--baselines",
        default="train",
        help="single-task baselines for Δm%%: 'train' (train one model per task first; built-in data), 'none', "
        'or a JSON file {"<task>/<metric>": value} (default: train)',
    )
    c.add_argument(
        "--config", default=None, help="LightningCLI YAML with model: and data: for your own model"
    )
    c.add_argument(
        "--log-every-n-steps", type=int, default=10, help="TensorBoard logging interval (default: 10)"
    )
    c.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    c.add_argument("--quiet", action="store_true", help="no progress display")
    for name in ("fit", "validate", "test"):
        sub.add_parser(
            name,
            help=f"LightningCLI '{name}' for a MultiTaskModule (e.g. lightning-mtl {name} --config my.yaml)",
            add_help=False,
        )
    return parser


def lightning_cli(argv: Sequence[str]) -> Any:
    """Lightning's ``LightningCLI`` for any :class:`~lightning_mtl.MultiTaskModule` and ``LightningDataModule``
    (class paths from the config; strategies and diagnostics go in ``trainer.callbacks``)."""
    from lightning.pytorch.cli import LightningCLI

    from lightning_mtl.module import MultiTaskModule

    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    return LightningCLI(
        MultiTaskModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(argv),
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-mtl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.getcwd() not in sys.path:  # class paths in configs may name modules of the current directory
        sys.path.insert(0, os.getcwd())
    if argv and argv[0] in ("fit", "validate", "test"):
        lightning_cli(argv)
        return 0
    args = build_parser().parse_args(argv)
    if args.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1, got {args.epochs}.")
    if args.devices < 1:
        raise SystemExit(f"--devices must be >= 1, got {args.devices}.")
    try:
        run_compare(args)
    except ValueError as err:
        raise SystemExit(f"lightning-mtl compare: {err}") from err
    return 0


if __name__ == "__main__":
    sys.exit(main())
