"""The command line: the ``compare`` options (argparse) and Lightning's ``LightningCLI`` for ``fit``,
``validate``, ``test`` and for reading a config that ``compare`` trains."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from lightning_mtl.cli.registry import DEFAULT_GRADIENT_BASED, DEFAULT_LOSS_BASED

#: the subcommands handed to LightningCLI
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-mtl`` parser. The options that a config can also set default to ``None``, so that the
    compare job can tell a flag given on the command line from its default."""
    parser = argparse.ArgumentParser(
        prog="lightning-mtl",
        description="Multi-task learning for PyTorch Lightning: compare strategies, or run a LightningCLI config.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compare",
        help="train one model with several strategies and write tables and plots",
        description="Train one multi-task model with several strategies; write TensorBoard runs (tb/<strategy>/), "
        "results.md / results.csv (per-task metrics, Δm%%, time per step, peak memory), weights.png and losses.png. "
        "With --config, the config's trainer settings, seed and callbacks apply unless a flag is given.",
    )
    c.add_argument(
        "--strategies",
        default=None,
        help="comma-separated strategy names, case-insensitive, 'Weighting' suffix optional (default: the "
        "config's strategy callback, else those available of "
        f"{', '.join(DEFAULT_LOSS_BASED + DEFAULT_GRADIENT_BASED)})",
    )
    c.add_argument("--dataset", default=None, help="built-in data set: digits or synthetic (default: digits)")
    c.add_argument(
        "--arch",
        default=None,
        help="comma-separated architectures of lightning_mtl.nn (HardSharing, CrossStitch, MTAN, MMoE, CGC, PLE, "
        "DSelectK, TaskRouting, MultiBackbone): every strategy is trained on each (built-in data; default: a shared "
        "MLP encoder with one head per task)",
    )
    c.add_argument(
        "--tasks", default=None, help="comma-separated subset of the data set's tasks (default: all)"
    )
    c.add_argument(
        "--epochs", type=int, default=None, help="training epochs per run (default: the config's, else 5)"
    )
    c.add_argument(
        "--devices",
        type=int,
        default=None,
        help="devices per run; > 1 uses ddp_spawn (default: the config's, else 1)",
    )
    c.add_argument("--accelerator", default=None, help="cpu, gpu, auto (default: the config's, else auto)")
    c.add_argument("--seed", type=int, default=None, help="seed of every run (default: the config's, else 0)")
    c.add_argument("--batch-size", type=int, default=None, help="batch size (built-in data; default: 64)")
    c.add_argument("--out", default="mtl_compare", help="output directory (default: mtl_compare)")
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="empty --out first if it is not empty (without it, a non-empty --out is refused)",
    )
    c.add_argument(
        "--baselines",
        default="train",
        help="single-task baselines for Δm%%: 'train' (train one model per task first on built-in data; with "
        "--config the baselines of its DeltaM callback), 'none', or a JSON file "
        '{"<task>/<metric>": value} (default: train)',
    )
    c.add_argument(
        "--config", default=None, help="LightningCLI YAML with model: and data: for your own model"
    )
    c.add_argument(
        "--log-every-n-steps",
        type=int,
        default=None,
        help="TensorBoard logging interval (default: the config's, else 10)",
    )
    c.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    c.add_argument("--quiet", action="store_true", help="no progress display")
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(
            name,
            help=f"LightningCLI '{name}' for a MultiTaskModule (e.g. lightning-mtl {name} --config my.yaml)",
            add_help=False,
        )
    return parser


def lightning_cli(argv: Sequence[str]) -> LightningCLI:
    """Lightning's ``LightningCLI`` for any :class:`~lightning_mtl.MultiTaskModule` and ``LightningDataModule``
    (class paths from the config; strategies and diagnostics go in ``trainer.callbacks``)."""
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


class _ConfigReader(LightningCLI):
    """Parses a config and builds its model, data and callbacks, but no Trainer: ``trainer_kwargs`` holds the
    config's Trainer arguments (callbacks built), from which the compare job builds a Trainer per run."""

    trainer_kwargs: dict[str, Any]

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        self.trainer_kwargs = {**self.config_init.get("trainer", {}), **kwargs}
        callbacks = self.trainer_kwargs.get("callbacks")
        if callbacks is None:
            self.trainer_kwargs["callbacks"] = []
        elif not isinstance(callbacks, list):
            self.trainer_kwargs["callbacks"] = [callbacks]
        return None


def read_config(config: str, seed: int | None = None) -> _ConfigReader:
    """The model, data module and Trainer arguments of a LightningCLI ``config`` (``model:`` and ``data:`` with
    ``class_path``), freshly built; seeded with ``seed``, or with the config's ``seed_everything`` if ``None``.
    The config's logger is not built (the compare job writes its own TensorBoard runs)."""
    from lightning_mtl.module import MultiTaskModule

    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    args = ["--config", config, "--trainer.logger=false"]
    if seed is not None:
        args.append(f"--seed_everything={seed}")
    return _ConfigReader(
        MultiTaskModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=False,
        save_config_callback=None,
        seed_everything_default=False,
    )
