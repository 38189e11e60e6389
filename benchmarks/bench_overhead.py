"""Per-step overhead of ``MultiTaskModule`` over a plain ``LightningModule``, and of loss-based strategies.

Same network (an MLP encoder + T linear heads, MSE per task), same data, same Trainer flags and the same
logger (a ``CSVLogger`` in a temporary directory) for every configuration. The plain module returns the
summed loss with automatic optimisation and logs it every step with ``self.log(..., prog_bar=True)``, as
``MultiTaskModule`` logs ``train/loss``. A callback (``_common.StepTimer``) times each whole training
iteration (one ``on_train_batch_start`` to the next: data, step, callbacks and log writing) in the main
thread's CPU time; each run's time per step is the mean after a warm-up (the mean, so that the steps that
write logs count). Configurations are interleaved within a repeat (order reversed every other repeat); the
table shows each configuration's best repeat and, as ratios, the median over repeats of the ratio between
runs of the same repeat, so that machine drift cancels.

Targets (DESIGN.md): ``MultiTaskModule`` + ``EqualWeighting`` ≤ 1.10× plain; loss-based strategies ≤ 1.05×
equal weighting.

    python benchmarks/bench_overhead.py                 # full run
    python benchmarks/bench_overhead.py --quick         # smoke run
    python benchmarks/bench_overhead.py --profile       # plus a cProfile of the MultiTaskModule step
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import BenchMTL, BenchPlain, StepTimer, make_loader, make_trainer, markdown_table  # noqa: E402

from lightning_mtl import strategies as S  # noqa: E402


def _loss_strategies() -> dict[str, Callable[[], Any]]:
    return {
        "EqualWeighting": S.EqualWeighting,
        "StaticWeighting": S.StaticWeighting,
        "UncertaintyWeighting": S.UncertaintyWeighting,
        "DWA": S.DWA,
        "RLW": S.RLW,
        "GLS": S.GLS,
        "SLAW": S.SLAW,
        "STCH": S.STCH,
        "IMTLL": S.IMTLL,
        "FAMO": S.FAMO,  # one extra no-grad forward per optimizer step (outside the ≤ 1.05× target)
        "ScaleInvariant": S.ScaleInvariant,
        "LogSE": S.LogSE,
        "DTP": S.DTP,  # on the KPI model (binary tasks with an accuracy metric), against equal weighting on it
    }


#: strategies run on the KPI model (``BenchMTL(kpi=True)``), and the equal-weighting baseline they compare with
KPI_STRATEGIES = {"DTP"}
KPI_BASELINE = "EqualWeighting (KPI model)"


def _baseline(config: str) -> str:
    """The equal-weighting configuration on the same model as ``config``."""
    return KPI_BASELINE if config in KPI_STRATEGIES else "EqualWeighting"


class HookClock:
    """Main-thread CPU time spent inside a strategy's own code per step: its ``backward`` (which includes the
    loss backward every strategy does) and its callback hooks. The difference to equal weighting's is the
    method's own cost, measured without the rest of the step's noise."""

    def __init__(self, strategy: Any) -> None:
        self.per_step: list[float] = []
        self._current = 0.0
        for name in dir(type(strategy)):
            if name == "backward" or name.startswith("on_"):
                method = getattr(strategy, name)
                if callable(method):
                    setattr(strategy, name, self._wrap(method, step_start=name == "on_train_batch_start"))

    def _wrap(self, method: Callable[..., Any], step_start: bool) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if step_start:
                self.per_step.append(self._current)
                self._current = 0.0
            t0 = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                self._current += time.thread_time() - t0

        return timed


def run_once(
    config: str, num_tasks: int, steps: int, warmup: int, batch_size: int, device: str
) -> tuple[float, float]:
    """``(mean time per step, median time per step inside the strategy)`` in seconds (``nan`` for plain)."""
    timer = StepTimer()
    callbacks: list[Any] = [timer]
    clock: HookClock | None = None
    if config == "plain":
        model: Any = BenchPlain(num_tasks)
    else:
        model = BenchMTL(num_tasks, kpi=config in KPI_STRATEGIES or config == KPI_BASELINE)
        strategy = S.EqualWeighting() if config == KPI_BASELINE else _loss_strategies()[config]()
        clock = HookClock(strategy)
        callbacks.append(strategy)
    loader = make_loader(num_tasks, n=batch_size * 64, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp, steps, callbacks, device)
        trainer.fit(model, loader)
    inside = statistics.median(clock.per_step[warmup + 1 :]) if clock is not None else float("nan")
    return statistics.fmean(timer.times[warmup:]), inside


def profile_mtl(num_tasks: int, steps: int, batch_size: int, device: str, top: int = 25) -> str:
    import cProfile
    import io
    import pstats

    model = BenchMTL(num_tasks)
    loader = make_loader(num_tasks, n=batch_size * 64, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp, steps, [S.EqualWeighting()], device)
        prof = cProfile.Profile()
        prof.enable()
        trainer.fit(model, loader)
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps and repeats (smoke run)")
    parser.add_argument("--tasks", type=int, default=10, help="number of tasks T (default 10)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 400, quick 60)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 5, quick 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--strategies",
        default=None,
        help="comma-separated loss-based strategies to compare with EqualWeighting (default: all)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: robust to a busy machine)"
    )
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the MultiTaskModule run")
    parser.add_argument("--output", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (60 if args.quick else 400)
    repeats = args.repeats or (1 if args.quick else 5)
    warmup = min(20, steps // 4)
    names = list(_loss_strategies())
    if args.strategies:
        wanted = [s.strip() for s in args.strategies.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown strategies {unknown}; choose from {names}")
        names = ["EqualWeighting"] + [s for s in wanted if s != "EqualWeighting"]
    reported = names + ([KPI_BASELINE] if any(n in KPI_STRATEGIES for n in names) else [])
    configs = ["plain"] + reported

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)

    times: dict[str, list[float]] = {c: [] for c in configs}
    inside: dict[str, list[float]] = {c: [] for c in configs}
    run_once("plain", args.tasks, min(steps, 40), 5, args.batch_size, args.device)  # process warm-up
    for r in range(repeats):
        order = configs if r % 2 == 0 else configs[::-1]
        for config in order:
            step, own = run_once(config, args.tasks, steps, warmup, args.batch_size, args.device)
            times[config].append(step)
            inside[config].append(own)
    best = {c: min(v) for c, v in times.items()}

    def ratio(a: str, b: str) -> float:
        """Median over repeats of the ratio of two configurations timed in the same repeat (drift cancels)."""
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(
        f"\nT = {args.tasks}, batch {args.batch_size}, {steps} steps x {repeats} repeats, device {args.device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    rows = [["plain LightningModule (sum)", f"{best['plain'] * 1e3:.3f}", "1.000", "—"]]
    for c in reported:
        base = _baseline(c)
        target = "≤ 1.10 vs plain" if c == "EqualWeighting" else "≤ 1.05 vs equal"
        if c == KPI_BASELINE:
            base, target = "EqualWeighting", "the baseline of DTP"
        elif base != "EqualWeighting":
            target = f"≤ 1.05 vs {base}"
        rows.append(
            [
                f"MultiTaskModule + {c}",
                f"{best[c] * 1e3:.3f}",
                f"{ratio(c, 'plain'):.3f}",
                f"{ratio(c, base):.3f} ({target})",
            ]
        )
    table = markdown_table(
        ["configuration", "ms/step (best repeat)", "ratio vs plain (median)", "ratio vs equal (median)"], rows
    )
    print(table)
    # the method's own cost: median time inside the strategy (its backward, which includes the loss backward,
    # and its hooks) minus equal weighting's on the same model, relative to equal weighting's whole step
    own = {c: statistics.median(v) for c, v in inside.items() if c != "plain"}
    step = {c: statistics.median(v) for c, v in times.items()}
    own_rows = []
    for c in reported:
        base = _baseline(c)
        if c in ("EqualWeighting", KPI_BASELINE):
            own_rows.append([c, f"{own[c] * 1e3:.3f}", "—", "—"])
            continue
        extra = own[c] - own[base]
        own_rows.append([c, f"{own[c] * 1e3:.3f}", f"{extra * 1e3:+.3f}", f"{1 + extra / step[base]:.3f}"])
    own_table = markdown_table(
        [
            "strategy",
            "ms/step inside the strategy (median)",
            "extra ms vs its equal weighting",
            "step ratio from the extra (≤ 1.05)",
        ],
        own_rows,
    )
    print("\nThe methods' own cost (time inside the strategy; robust to the rest of the step's noise):\n")
    print(own_table)
    overhead = ratio("EqualWeighting", "plain")
    verdict = "met" if overhead <= 1.10 else "MISSED"
    print(f"\nMultiTaskModule + EqualWeighting / plain = {overhead:.3f} (target ≤ 1.10: {verdict})")
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(table + "\n\n" + own_table + "\n")
    if args.profile:
        print(profile_mtl(args.tasks, steps, args.batch_size, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
