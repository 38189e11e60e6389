"""The ``lightning-mtl compare`` job: train one model with several strategies (on a built-in data set or a
user's LightningCLI config), optionally single-task baselines first, and write the report."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_mtl.callbacks import DeltaM
from lightning_mtl.cli.recording import ProgressUpdater, Recorder, RunRecord
from lightning_mtl.cli.registry import default_strategies, make_strategy, resolve_strategy
from lightning_mtl.cli.report import metric_keys, print_table, write_plots, write_tables
from lightning_mtl.cli.setups import CompareSetup, Settings, builtin_setup, config_setup, resolve_settings
from lightning_mtl.metrics import delta_m

_BASELINES_FORMAT = (
    "'train', 'none' or a JSON file {\"<task>/<metric>\": value, ...} such as the baselines.json that "
    "lightning-mtl compare --baselines train writes"
)


def load_baselines(path: str) -> dict[str, float]:
    """The single-task baselines of a ``--baselines`` JSON file; a one-line error naming the file otherwise."""
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise ValueError(f"--baselines {path} {what}; expected {_BASELINES_FORMAT}.")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"--baselines {path} is not readable JSON ({err}); expected {_BASELINES_FORMAT}."
        ) from None
    numbers = isinstance(data, dict) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in data.values()
    )
    if not numbers:
        raise ValueError(
            f"--baselines {path} holds {json.dumps(data)[:80]}, not an object of numbers; expected "
            f"{_BASELINES_FORMAT}."
        )
    return {str(k): float(v) for k, v in data.items()}


def prepare_out(out: Path, overwrite: bool) -> None:
    """Creates ``out``; a non-empty ``out`` is refused (its old TensorBoard runs would mix with the new ones),
    or emptied with ``overwrite``: only what is inside ``out``, and never the working directory, one of its
    parents or the home directory."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory; name a directory.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(
                f"--out {out} is not empty (an earlier comparison?): its TensorBoard runs would mix with the new "
                "ones. Pass --overwrite to empty it first, or name another --out directory."
            )
        target, cwd = out.resolve(), Path.cwd().resolve()
        if target == cwd or target in cwd.parents or target == Path.home().resolve():
            raise ValueError(
                f"--overwrite would empty {out} ({target}), the working directory, one of its parents or the home "
                "directory; name a directory for the comparison's outputs only."
            )
        for entry in out.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silences Lightning's info logs and the warnings that do not apply to a comparison's small runs, for the
    duration of the ``with`` block: the loggers' levels and the warning filters are restored afterwards (a
    program that calls :func:`run_compare` keeps its own logging)."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        for message in (
            "does not have many workers",
            "LeafSpec",
            "The number of training batches",
            "litlogger",
        ):
            warnings.filterwarnings("ignore", message=f".*{message}.*")
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def _fit(
    setup: CompareSetup,
    settings: Settings,
    name: str,
    strategy_name: str | None,
    out: Path,
    baselines: dict[str, float] | None,
    progress: Any,
    subset: Sequence[str] | None = None,
    tb_name: str | None = None,
    arch: str | None = None,
) -> RunRecord:
    """One run: ``strategy_name`` (``None``: the config's strategy callback) on a fresh model (architecture
    ``arch`` of :mod:`lightning_mtl.nn` on built-in data, ``None``: the default model) and data."""
    from lightning.pytorch.loggers import TensorBoardLogger

    run = setup.build(subset, settings.seed, arch)
    strategy = run.strategy if strategy_name is None else make_strategy(strategy_name)
    record_path = out / ".records" / f"{tb_name or name}.json"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    callbacks: list[Callback] = [strategy, Recorder(str(record_path)), *run.callbacks]
    if baselines:
        callbacks.append(DeltaM(baselines))
    task_id = None
    if progress is not None and settings.devices == 1:
        run.data.setup("fit")
        task_id = progress.add_task(name, total=settings.epochs * len(run.data.train_dataloader()), status="")
        callbacks.append(ProgressUpdater(progress, task_id))
    kwargs = dict(setup.trainer_kwargs)
    if (
        isinstance(settings.devices, int)
        and settings.devices > 1
        and kwargs.get("strategy", "auto") == "auto"
    ):
        kwargs["strategy"] = "ddp_spawn"  # "ddp" would re-launch the command for every run
    trainer = pl.Trainer(
        **{
            **kwargs,
            "max_epochs": settings.epochs,
            "accelerator": settings.accelerator,
            "devices": settings.devices,
            "log_every_n_steps": settings.log_every_n_steps,
            "logger": TensorBoardLogger(
                str(out / "tb"), name=tb_name or name, version="", default_hp_metric=False
            ),
            "callbacks": callbacks,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        }
    )
    trainer.fit(run.model, datamodule=run.data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    record = RunRecord.load(name, metrics, record_path)
    if task_id is not None:
        dm = f", Δm% {record.delta_m:+.2f}" if record.delta_m is not None else ""
        progress.update(task_id, status=f"{record.ms_per_step:.1f} ms/step{dm}")
    return record


def _strategies(
    args: argparse.Namespace, setup: CompareSetup, notes: list[str]
) -> list[tuple[str, str | None]]:
    """(display name, strategy name or ``None`` for the config's strategy callback) of every run."""
    if args.strategies is None and setup.strategy is not None:
        return [(setup.strategy, None)]
    names = [s for s in (args.strategies or "").split(",") if s] or default_strategies()
    runs = [(resolve_strategy(n).__name__, n) for n in names]
    if len({n for n, _ in runs}) != len(runs):
        raise ValueError(f"--strategies lists a strategy twice: {names}.")
    if setup.strategy is not None:
        notes.append(f"--strategies replaces the config's strategy callback {setup.strategy}")
    return runs


def _baselines(
    args: argparse.Namespace, setup: CompareSetup, settings: Settings, out: Path, progress: Any
) -> dict[str, float] | None:
    """Δm%'s single-task baselines: trained here (``--baselines train`` on built-in data), from the config's
    ``DeltaM``, or from a file; ``None`` without any."""
    if args.baselines == "none":
        return None
    if args.baselines != "train":
        baselines = load_baselines(args.baselines)
    elif setup.can_train_baselines and len(setup.task_names) > 1:
        baselines = {}
        for task in setup.main_tasks or setup.task_names:  # auxiliary tasks are not results: no baseline
            name, tb_name = f"single-task {task}", f"single_task/{task}"
            rec = _fit(setup, settings, name, "EqualWeighting", out, None, progress, [task], tb_name)
            baselines.update({key: rec.metrics[f"val/{key}"] for key in metric_keys(rec, [task])})
        (out / "baselines.json").write_text(json.dumps(baselines, indent=2))
    else:
        baselines = dict(setup.baselines or {})
    return {k: v for k, v in baselines.items() if v != 0} or None


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison described by ``args`` (see ``lightning-mtl compare --help``); returns a summary.
    Lightning's info logs and inapplicable warnings are silenced while it runs (:func:`quiet_lightning`)."""
    with quiet_lightning():
        return _run_compare(args)


def _run_compare(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    out = Path(args.out)
    if args.baselines not in ("train", "none"):
        load_baselines(args.baselines)  # a bad file is an error before any training
    setup = config_setup(args) if args.config else builtin_setup(args)
    settings = resolve_settings(args, setup.configured)
    notes = settings.notes + setup.notes
    strategies = _strategies(args, setup, notes)
    if args.config and setup.baselines and args.baselines not in ("train", "none"):
        notes.append(f"--baselines {args.baselines} replaces the baselines of the config's DeltaM callback")
    prepare_out(out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)

    for note in notes:
        console.print(f"note: {note}")
    archs = setup.architectures
    runs = [(f"{arch}/{d}" if arch else d, name, arch) for arch in archs for d, name in strategies]
    on = f" × {len(archs)} architectures" if archs != [None] else ""
    console.print(
        f"[bold]lightning-mtl compare[/bold]: {len(strategies)} strategies{on} on {setup.label}, tasks "
        f"{list(setup.task_names)}, {settings.epochs} epochs, seed {settings.seed} -> {out}/"
    )
    columns = [
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=console, disable=args.quiet) as progress:
        baselines = _baselines(args, setup, settings, out, progress)
        records = [
            _fit(setup, settings, display, name, out, baselines, progress, arch=arch)
            for display, name, arch in runs
        ]

    # auxiliary tasks (Task(role="auxiliary")) are trained but not results: Δm% and the table use the main tasks
    main = setup.main_tasks or setup.task_names
    auxiliary = [t for t in setup.task_names if t not in main]
    if baselines:
        baselines = {k: v for k, v in baselines.items() if k.split("/", 1)[0] in main} or None
    for rec in records:
        if rec.delta_m is None and baselines:
            values = {k: rec.metrics.get(f"val/{k}", math.nan) for k in baselines}
            directions = {k: setup.directions.get(k, False) for k in baselines}
            rec.delta_m = delta_m(values, baselines, directions, tasks=main)
    model = f"architectures {', '.join(str(a) for a in archs)}; " if archs != [None] else ""
    tasks = ", ".join(main) + (f" (auxiliary, not reported: {', '.join(auxiliary)})" if auxiliary else "")
    described = (
        f"{setup.label}; {model}tasks {tasks}; {settings.epochs} epochs; seed {settings.seed}; "
        f"devices {settings.devices}"
    )
    titles, cells = write_tables(out, records, main, setup.directions, baselines, described)
    plots = "".join(f", {p}" for p in write_plots(out, records, setup.task_names))
    if not args.quiet:
        print_table(console, titles, cells)
    console.print(f"wrote {out}/results.md, {out}/results.csv{plots}, TensorBoard runs in {out}/tb/")
    keys = metric_keys(records[0], main) if records else []
    return {"records": records, "baselines": baselines, "metric_keys": keys}
