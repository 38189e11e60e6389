"""What ``lightning-mtl compare`` trains: a built-in data set, or the model, data, Trainer settings and callbacks
of a LightningCLI config; and the run settings from the flags, the config and the defaults, in that order."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar

from lightning_mtl.callbacks import DeltaM
from lightning_mtl.strategies.base import MTLStrategy
from lightning_mtl.task import main_task_names

#: flag (argparse dest) -> (the config key it sets, its default where neither flag nor config sets it)
FLAG_KEYS = {
    "epochs": ("trainer.max_epochs", 5),
    "devices": ("trainer.devices", 1),
    "accelerator": ("trainer.accelerator", "auto"),
    "log_every_n_steps": ("trainer.log_every_n_steps", 10),
    "seed": ("seed_everything", 0),
}
#: the built-in data sets' flags, refused with --config
BUILTIN_ONLY = {"dataset": "digits", "tasks": None, "batch_size": 64, "arch": None}


@dataclass
class Run:
    """The fresh objects of one run: model, data, the strategy a config names, the callbacks to keep."""

    model: pl.LightningModule
    data: pl.LightningDataModule
    strategy: MTLStrategy | None = None
    callbacks: list[Callback] = field(default_factory=list)


@dataclass
class CompareSetup:
    """How the runs of a comparison are built: from a built-in data set, or from a user's config."""

    build: Callable[..., Run]  # (task subset or None, seed, architecture or None) -> fresh objects
    task_names: tuple[str, ...]
    label: str
    directions: dict[str, bool]  # "<task>/<metric>" -> higher is better
    can_train_baselines: bool
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # the config's Trainer arguments
    configured: dict[str, Any] = field(default_factory=dict)  # the FLAG_KEYS keys the config sets
    strategy: str | None = None  # class name of the config's strategy callback
    baselines: dict[str, float] | None = None  # from a DeltaM callback in the config
    notes: list[str] = field(default_factory=list)  # what the compare job replaces in the config
    architectures: list[str | None] = field(default_factory=lambda: [None])  # --arch (built-in data)
    main_tasks: tuple[str, ...] | None = None  # the reported tasks (None: all); the others are auxiliary


@dataclass
class Settings:
    """The resolved run settings, and a note per flag that overrides the config."""

    epochs: int
    devices: int | str | list[int]  # a config may give "2" or [0, 1]
    accelerator: str
    log_every_n_steps: int
    seed: int
    notes: list[str] = field(default_factory=list)


def resolve_settings(args: argparse.Namespace, configured: dict[str, Any]) -> Settings:
    """Each setting from its flag if given, else from the config, else its default; a note for each flag
    that replaces a different value of the config."""
    values, notes = {}, []
    for dest, (key, default) in FLAG_KEYS.items():
        given = getattr(args, dest)
        if given is None:
            values[dest] = configured.get(key, default)
            continue
        values[dest] = given
        if key in configured and configured[key] != given:
            notes.append(f"--{dest.replace('_', '-')} {given} overrides the config's {key}={configured[key]}")
    return Settings(**values, notes=notes)


def _trainer_default(name: str) -> Any:
    return inspect.signature(pl.Trainer.__init__).parameters[name].default


def directions_of(model: Any) -> dict[str, bool]:
    """Whether higher is better, per ``<task>/<metric>`` key of the model's metrics and ``<task>/loss``."""
    tm = getattr(model, "task_metrics", None)
    directions = dict(tm.higher_is_better) if tm is not None else {}
    directions.update({f"{n}/loss": False for n in model.task_names})
    return directions


def builtin_setup(args: argparse.Namespace) -> CompareSetup:
    """A comparison on a built-in data set (``--dataset``, ``--tasks``, ``--batch-size``)."""
    from lightning_mtl.datasets import (
        ArchitectureMultiTask,
        BuiltinDataModule,
        MLPMultiTask,
        load_dataset,
        select_tasks,
    )
    from lightning_mtl.nn import resolve_architecture

    dataset = args.dataset or BUILTIN_ONLY["dataset"]
    batch_size = args.batch_size or BUILTIN_ONLY["batch_size"]
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    names = tuple(s.name for s in select_tasks(load_dataset(dataset), tasks))

    architectures: list[str | None] = [None]
    if args.arch:
        architectures = [resolve_architecture(a) for a in args.arch.split(",") if a]
        if len(set(architectures)) != len(architectures):
            raise ValueError(f"--arch lists an architecture twice: {args.arch}.")

    def build(subset: Sequence[str] | None, seed: int, arch: str | None = None) -> Run:
        pl.seed_everything(seed, verbose=False)
        tasks = list(subset or names)
        model = (
            MLPMultiTask(dataset, tasks, lr=3e-3)
            if arch is None
            else ArchitectureMultiTask(dataset, arch, tasks, lr=3e-3)
        )
        return Run(model, BuiltinDataModule(dataset, batch_size=batch_size))

    return CompareSetup(
        build=build,
        task_names=names,
        label=f"built-in data set '{dataset}'",
        directions=directions_of(MLPMultiTask(dataset, list(names))),
        can_train_baselines=True,
        trainer_kwargs={"enable_checkpointing": False, "num_sanity_val_steps": 0, "deterministic": False},
        architectures=architectures,
    )


def config_setup(args: argparse.Namespace) -> CompareSetup:
    """A comparison of the model and data of a LightningCLI config (``--config``). Every run gets the config's
    Trainer settings and callbacks; the config's strategy callback (at most one) is compared when
    ``--strategies`` is not given."""
    from lightning_mtl.cli.parser import read_config

    given = [f"--{dest.replace('_', '-')}" for dest in BUILTIN_ONLY if getattr(args, dest) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} applies to the built-in data sets; with --config the config's model: and data: "
            f"define the tasks and the data (edit {args.config} instead)."
        )
    probe = read_config(args.config)
    kwargs = dict(probe.trainer_kwargs)
    callbacks = kwargs.pop("callbacks")
    kwargs.pop("logger", None)
    strategies = [cb for cb in callbacks if isinstance(cb, MTLStrategy)]
    if len(strategies) > 1:
        raise ValueError(
            f"{args.config} lists {len(strategies)} strategy callbacks in trainer.callbacks "
            f"({', '.join(type(s).__name__ for s in strategies)}); a Trainer takes exactly one. Keep one."
        )
    configured = {}
    for key, _ in FLAG_KEYS.values():
        section, _, name = key.partition(".")
        if section == "trainer" and kwargs.get(name, _trainer_default(name)) != _trainer_default(name):
            configured[key] = kwargs[name]
    seed = probe.config.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool):
        configured["seed_everything"] = seed
    from_config = [cb.baselines for cb in callbacks if isinstance(cb, DeltaM)]
    display = [type(cb).__name__ for cb in callbacks if isinstance(cb, (ProgressBar, ModelSummary))]
    notes = [f"the compare display replaces the config's {name} callback" for name in display]

    def build(subset: Sequence[str] | None, seed: int, arch: str | None = None) -> Run:
        cli = read_config(args.config, seed)
        strategy = next((cb for cb in cli.trainer_kwargs["callbacks"] if isinstance(cb, MTLStrategy)), None)
        return Run(cli.model, cli.datamodule, strategy, kept_callbacks(cli.trainer_kwargs["callbacks"]))

    return CompareSetup(
        build=build,
        task_names=tuple(probe.model.task_names),
        main_tasks=main_task_names(probe.model.tasks),
        label=f"config {args.config} ({type(probe.model).__name__})",
        directions=directions_of(probe.model),
        can_train_baselines=False,
        trainer_kwargs=kwargs,
        configured=configured,
        strategy=type(strategies[0]).__name__ if strategies else None,
        baselines=from_config[0] if from_config else None,
        notes=notes,
    )


def kept_callbacks(callbacks: Sequence[Callback]) -> list[Callback]:
    """The config's callbacks that every run keeps: all but the strategy (one per run, chosen by the compare
    job), ``DeltaM`` (the compare job adds its own with the baselines it uses) and the progress bar and model
    summary (the compare job shows its own progress)."""
    replaced = (MTLStrategy, DeltaM, ProgressBar, ModelSummary)
    return [cb for cb in callbacks if not isinstance(cb, replaced)]
