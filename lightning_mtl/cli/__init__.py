"""The ``lightning-mtl`` command.

* ``lightning-mtl compare``: train one model with several strategies on a built-in multi-task data set (or on
  the user's model and data from a LightningCLI YAML config) and write TensorBoard runs, a Markdown/CSV
  results table (per-task metrics, Δm%, time per step, peak memory) and PNG plots of the task weights and
  task losses (:mod:`~lightning_mtl.cli.compare`, :mod:`~lightning_mtl.cli.report`).
* ``lightning-mtl fit|validate|test --config my.yaml``: Lightning's own ``LightningCLI`` for a
  :class:`~lightning_mtl.MultiTaskModule`, where every strategy and diagnostics callback is configurable
  (``trainer.callbacks: [{class_path: lightning_mtl.strategies.PCGrad, init_args: {...}}]``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lightning_mtl.cli.compare import run_compare
from lightning_mtl.cli.parser import LIGHTNING_SUBCOMMANDS, build_parser, lightning_cli
from lightning_mtl.cli.recording import RunRecord
from lightning_mtl.cli.registry import (
    DEFAULT_GRADIENT_BASED,
    DEFAULT_LOSS_BASED,
    available_strategies,
    default_strategies,
    make_strategy,
    resolve_strategy,
)

__all__ = [
    "DEFAULT_GRADIENT_BASED",
    "DEFAULT_LOSS_BASED",
    "RunRecord",
    "available_strategies",
    "build_parser",
    "default_strategies",
    "lightning_cli",
    "main",
    "make_strategy",
    "resolve_strategy",
    "run_compare",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-mtl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # class paths in configs may name modules of the working directory; appended, so that a local folder
    # named like an installed package does not shadow it
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        lightning_cli(argv)
        return 0
    args = build_parser().parse_args(argv)
    for flag in ("epochs", "devices"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"lightning-mtl compare: --{flag} must be >= 1, got {value}.")
    try:
        run_compare(args)
    except ValueError as err:
        raise SystemExit(f"lightning-mtl compare: {err}") from None
    return 0
