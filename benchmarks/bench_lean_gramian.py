"""Peak memory and step time of the lean Gramian engine (``jacobian="lean"``) against today's engine.

Issue 11 §3's goal: at ``T = 40`` on a model with ≥ 10 M shared parameters, the peak memory of a Jacobian-mode
step ≤ equal weighting's + 25 % of ``T·P·4`` bytes (the full Jacobian's size), at ≤ 1.5× the time of today's
engine (``jacobian="batched"``: the whole ``T × P`` Jacobian by one batched backward, then ``G = J Jᵀ``).

The model: an MLP encoder of ``depth`` ``width × width`` linear layers (ReLU) on ``width``-d inputs (shared:
``depth·width·(width+1)`` parameters, 10.5 M for the defaults) and ``T`` linear heads, MSE per task, SGD, the
real Lightning path (``MultiTaskModule`` + strategy callback, ``Trainer.fit``). Engines compared, per method:

- ``batched``: today's engine (holds ``J [T, P]``);
- ``lean``: the lean engine's hooks route (one ``vmap``-ed backward, parameter hooks fold each parameter's
  ``J_p`` into ``G`` and free it) — what a single process uses;
- ``lean-blocks``: the lean engine's blocks route (one batched backward per block of ≤ P/8 parameters) — what
  DDP with ``sync="exact"`` uses (each block is all-reduced before its product), measured here on one process.

Memory (CPU): the peak of the running sum of tensor allocations minus frees recorded by ``torch.profiler``
(``profile_memory=True``) over one training step (the third), i.e. the bytes newly held by tensors at the
step's worst moment relative to its start (parameters and their ``.grad`` from the previous step excluded,
identically for every engine); on CUDA ``max_memory_allocated`` minus the step's starting allocation. Time:
median over steps after one warm-up of the time from one ``on_train_batch_start`` to the next (CPU: the main
thread's CPU time with one torch thread, which charges no time spent on other processes; CUDA: wall time).

    python benchmarks/bench_lean_gramian.py                       # T = 40, 10 x 1024² (10.5 M), batch 8
    python benchmarks/bench_lean_gramian.py --methods UPGrad --steps 3 --depth 10 --width 1024
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning_mtl import MultiTaskModule  # noqa: E402
from lightning_mtl.strategies.equal import EqualWeighting  # noqa: E402
from lightning_mtl.strategies.mgda import MGDA  # noqa: E402
from lightning_mtl.strategies.pcgrad import PCGrad  # noqa: E402
from lightning_mtl.strategies.upgrad import UPGrad  # noqa: E402

METHODS: dict[str, Any] = {"UPGrad": UPGrad, "PCGrad": PCGrad, "MGDA": MGDA}


class DeepMLP(MultiTaskModule):
    def __init__(self, num_tasks: int, width: int, depth: int) -> None:
        super().__init__(tasks=[f"t{i}" for i in range(num_tasks)])
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.Linear(width, num_tasks)  # T linear heads in one matrix

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        out = self.heads(self.encoder(x))
        per_task = (out - y).pow(2).mean(0)
        return {name: per_task[i] for i, name in enumerate(self.task_names)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


class Probe(Callback):
    """Step times (all steps) and the peak memory of step ``memory_step``."""

    def __init__(self, memory_step: int) -> None:
        self.memory_step = memory_step
        self.times: list[float] = []
        self.peak_bytes = float("nan")
        self._last: float | None = None
        self._prof: Any = None
        self._base = 0

    def _now(self, module: pl.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.thread_time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        now = self._now(pl_module)
        if self._last is not None and self._prof is None:
            self.times.append(now - self._last)
        self._last = None
        if batch_idx == self.memory_step:
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                self._base = torch.cuda.memory_allocated()
            else:
                from torch.profiler import ProfilerActivity, profile

                self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self._prof.__enter__()
        self._last = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx != self.memory_step:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = float(torch.cuda.max_memory_allocated() - self._base)
        elif self._prof is not None:
            self._prof.__exit__(None, None, None)
            total = peak = 0
            for event in sorted(self._prof.events(), key=lambda e: e.time_range.start):
                total += event.self_cpu_memory_usage
                peak = max(peak, total)
            self.peak_bytes = float(peak)
            self._prof = None
        self._last = None  # the profiled step is not timed


def run(args: argparse.Namespace, make_strategy: Any, route: str | None) -> tuple[float, float]:
    model = DeepMLP(args.tasks, args.width, args.depth)
    strategy = make_strategy()
    calls = []
    if route is not None and route != "batched":
        engine = strategy._gradients._lean_engine
        engine.hooks = route == "lean"  # lean-blocks: the route DDP with sync="exact" takes
        strategy._gradients._lean_engine = lambda *a, **k: calls.append(1) or engine(*a, **k)
    n = args.batch * (args.steps + 2)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, args.width, generator=g), torch.randn(n, args.tasks, generator=g))
    probe = Probe(memory_step=1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator=args.device,
            devices=1,
            max_steps=args.steps + 1,
            logger=False,
            callbacks=[strategy, probe],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=tmp,
        )
        trainer.fit(model, DataLoader(data, batch_size=args.batch, drop_last=True))
    if route is not None and route != "batched":
        assert len(calls) == args.steps + 1, "the lean engine was not used"
    times = probe.times[1:] or probe.times  # drop the warm-up step
    return statistics.median(times), probe.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (plus one warm-up, one profiled)")
    parser.add_argument("--methods", default="UPGrad,PCGrad")
    parser.add_argument("--routes", default="batched,lean,lean-blocks")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    P = args.depth * args.width * (args.width + 1)
    jac = args.tasks * P * 4
    print(f"T = {args.tasks}, shared P = {P / 1e6:.2f} M, T·P·4 = {jac / 2**20:.0f} MiB, batch {args.batch}")
    ew_time, ew_peak = run(args, EqualWeighting, None)
    print(f"EqualWeighting: {ew_time * 1e3:.0f} ms/step, peak {ew_peak / 2**20:.1f} MiB")
    budget = ew_peak + 0.25 * jac
    print(f"memory goal: peak <= EW + 25% of T·P·4 = {budget / 2**20:.0f} MiB\n")
    header = "| method | engine | ms/step | vs batched | vs EW | peak MiB | (peak − EW) / T·P·4 | goal met |"
    print(header)
    print("|" + "---|" * 8)
    for method in args.methods.split(","):
        cls = METHODS[method]
        base_time = None
        for route in args.routes.split(","):
            jacobian = "batched" if route == "batched" else "lean"
            t, peak = run(args, lambda cls=cls, j=jacobian: cls(jacobian=j), route)
            if route == "batched":
                base_time = t
            vs = f"{t / base_time:.2f}" if base_time else "-"
            extra = (peak - ew_peak) / jac
            ok = "yes" if peak <= budget and (base_time is None or t <= 1.5 * base_time) else "no"
            print(
                f"| {method} | {route} | {t * 1e3:.0f} | {vs} | {t / ew_time:.2f} | {peak / 2**20:.0f} | "
                f"{extra:.3f} | {ok} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
