"""Parameters, step time and peak memory of every architecture of ``lightning_mtl.nn``, as ratios to hard sharing.

Each architecture is built by ``lightning_mtl.nn.build_architecture`` for vector input (32 features, hidden width
64, one output per task) inside a ``MultiTaskModule`` that writes no ``shared_parameters()``, and trained through
the full ``Trainer.fit`` loop with equal weighting (the architecture's own cost) and, with ``--strategy``, any other
strategy. Time per step and peak memory are measured as in ``bench_strategies.py`` (the main thread's CPU time on
CPU; the peak of tensor allocations of two steps from ``torch.profiler`` on CPU, ``max_memory_allocated`` on CUDA).

    python benchmarks/bench_architectures.py --quick
    python benchmarks/bench_architectures.py --tasks 3,40 --many 100 --output bench_architectures.md
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import StepTimer, make_loader, make_trainer, markdown_table, task_names  # noqa: E402
from bench_strategies import MemoryProbe, _fmt_mem, load_strategy  # noqa: E402

from lightning_mtl import MultiTaskModule  # noqa: E402
from lightning_mtl.nn import ARCHITECTURES, build_architecture  # noqa: E402

#: architectures also measured at the large task count (``--many``), as the issue asks
MANY_TASKS = ("TaskRouting", "MMoE")


class ArchNet(MultiTaskModule):
    """An architecture + MSE per task; no ``shared_parameters()``: the architecture declares them."""

    def __init__(self, arch: str, num_tasks: int, hidden: int = 64) -> None:
        super().__init__(tasks=task_names(num_tasks))
        torch.manual_seed(0)
        self.model = build_architecture(arch, self.task_names, 32, {t: 1 for t in self.task_names}, hidden)

    def task_losses(self, batch, batch_idx):
        x, y = batch
        out = self.model(x)
        losses = {
            t: nn.functional.mse_loss(out[t].squeeze(1), y[:, i]) for i, t in enumerate(self.task_names)
        }
        for t, term in getattr(self.model, "aux_losses", {}).items():
            losses[t] = losses[t] + term
        return losses

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def run(
    arch: str, num_tasks: int, strategy: str, steps: int, batch_size: int, device: str
) -> dict[str, float]:
    factory = load_strategy(strategy)
    assert factory is not None, f"unknown strategy {strategy}"
    timer, probe = StepTimer(), MemoryProbe(start=min(3, steps - 3), count=2)
    model = ArchNet(arch, num_tasks)
    loader = make_loader(num_tasks, n=batch_size * steps, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        make_trainer(tmp, steps, [factory(), timer, probe], device).fit(model, loader)
    skip = set(range(probe.start, probe.start + probe.count))
    times = [t for i, t in enumerate(timer.times) if i >= min(5, steps // 3) and i not in skip]
    return {
        "params": float(sum(p.numel() for p in model.parameters())),
        "shared": float(sum(p.numel() for p in model.shared_parameters())),
        "ms": 1000 * statistics.median(times),
        "peak": probe.peak_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="3,40", help="task counts (default: 3,40)")
    parser.add_argument(
        "--many", type=int, default=100, help=f"task count for {', '.join(MANY_TASKS)} (0: skip)"
    )
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--strategy", default="EqualWeighting")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="T = 3 only, 12 steps")
    parser.add_argument("--output", default=None, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    counts = [3] if args.quick else [int(t) for t in args.tasks.split(",")]
    steps = 12 if args.quick else args.steps
    archs = args.archs.split(",")
    plan = [(a, t) for t in counts for a in archs]
    if args.many and not args.quick:
        plan += [(a, args.many) for a in MANY_TASKS if a in archs]
    results = {(a, t): run(a, t, args.strategy, steps, args.batch_size, args.device) for a, t in plan}
    rows = []
    for a, t in plan:
        r, base = results[(a, t)], results.get(("HardSharing", t))
        ratio = f"{r['ms'] / base['ms']:.2f}×" if base else "—"
        mem_ratio = f"{r['peak'] / base['peak']:.2f}×" if base and base["peak"] > 0 else "—"
        rows.append(
            [
                a,
                t,
                f"{int(r['params']):,}",
                f"{int(r['shared']):,}",
                f"{r['ms']:.2f}",
                ratio,
                _fmt_mem(r["peak"]),
                mem_ratio,
            ]
        )
    header = [
        "architecture",
        "T",
        "parameters",
        "shared",
        "ms/step",
        "vs HardSharing",
        "peak memory (MiB)",
        "vs HardSharing",
    ]
    table = markdown_table(header, rows)
    print(f"strategy {args.strategy}, batch {args.batch_size}, {steps} steps, device {args.device}\n")
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
