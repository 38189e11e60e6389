"""Per-step time and peak memory of every strategy, as ratios to equal weighting, and against TorchJD.

Two parts, both on the same networks (an MLP or a small CNN encoder + T linear heads, MSE per task):

1. **Lightning path**: ``MultiTaskModule`` + each strategy callback, the full ``Trainer.fit`` loop (CSVLogger,
   same flags). Time per step: median of ``on_train_batch_start → on_train_batch_end`` after a warm-up, median
   over repeats (and the best repeat: a shared machine's slow spells only ever add time). Peak memory of two
   training steps: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak of the running sum of tensor
   allocations minus frees recorded by ``torch.profiler`` with ``profile_memory=True``, i.e. bytes newly held
   by tensors at the worst moment, relative to the start.
2. **Plain torch loop, ours vs TorchJD**: one training step written by hand for both libraries on the same
   model and batch. Ours: the ``T × P`` Jacobian of the shared parameters by one batched backward
   (:func:`lightning_mtl.gradients.jacobian`), the method's weights from the Gramian
   (``lightning_mtl.functional.<method>_weights``), then one backward of ``Σ wᵢLᵢ`` — the shape our strategy
   callbacks use. TorchJD 0.18: ``torchjd.autojac.mtl_backward(losses, features=z)`` then
   ``jac_to_grad(shared_params, aggregator)``. Ratios are to a plain ``sum(losses).backward()`` step.

Strategies or methods that have not landed in the package are skipped (listed at the end).

    python benchmarks/bench_strategies.py --quick
    python benchmarks/bench_strategies.py --tasks 2,10,40 --models mlp,cnn --output bench_strategies.md
    python benchmarks/bench_strategies.py --strategies PCGrad,UPGrad --tasks 10 --device cuda
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import BenchMTL, StepTimer, build_encoder, make_loader, make_trainer, markdown_table  # noqa: E402

# name -> (module under lightning_mtl.strategies, class, kwargs)
STRATEGIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "EqualWeighting": ("equal", "EqualWeighting", {}),
    "UncertaintyWeighting": ("uncertainty", "UncertaintyWeighting", {}),
    "DWA": ("dwa", "DWA", {}),
    "RLW": ("rlw", "RLW", {}),
    "GLS": ("gls", "GLS", {}),
    "SLAW": ("slaw", "SLAW", {}),
    "STCH": ("stch", "STCH", {}),
    "IMTLL": ("imtl", "IMTLL", {}),
    "FAMO": ("famo", "FAMO", {}),
    "GradNorm": ("gradnorm", "GradNorm", {}),
    "PCGrad": ("pcgrad", "PCGrad", {}),
    "MGDA": ("mgda", "MGDA", {}),
    "MGDA-UB": ("mgda", "MGDA", {"mode": "representation"}),
    "CAGrad": ("cagrad", "CAGrad", {}),
    "IMTLG": ("imtl_g", "IMTLG", {}),
    "IMTL": ("imtl", "IMTL", {}),
    "NashMTL": ("nash_mtl", "NashMTL", {}),
    "UPGrad": ("upgrad", "UPGrad", {}),
    "DualProj": ("upgrad", "DualProj", {}),
    "AlignedMTL": ("aligned_mtl", "AlignedMTL", {}),
    "FairGrad": ("fairgrad", "FairGrad", {}),
    "GradVac": ("gradvac", "GradVac", {}),
    "GradDrop": ("graddrop", "GradDrop", {}),
    "ScaleInvariant": ("logse", "ScaleInvariant", {}),
    "LogSE": ("logse", "LogSE", {}),
    "ExcessMTL": ("excess_mtl", "ExcessMTL", {}),
    "MoCo": ("moco", "MoCo", {}),
    "DBMTL": ("dbmtl", "DBMTL", {}),
    "MoDo": ("modo", "MoDo", {}),  # 2 disjoint batch parts (samples=2): an even batch size keeps them equal
    "SDMGrad": ("sdmgrad", "SDMGrad", {}),
}


def load_strategy(name: str) -> Callable[[], Any] | None:
    module_name, cls_name, kwargs = STRATEGIES[name]
    try:
        module = importlib.import_module(f"lightning_mtl.strategies.{module_name}")
        cls = getattr(module, cls_name)
    except (ImportError, AttributeError):
        return None
    return lambda: cls(**kwargs)


# ---------------------------------------------------------------------------------------------- memory
def _cpu_peak_bytes(prof: Any) -> float:
    """Peak bytes held by tensors during a CPU profile (``profile_memory=True``): the running sum, in
    chronological order, of every event's own allocations minus frees."""
    total = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        total += event.self_cpu_memory_usage
        peak = max(peak, total)
    return float(peak)


class MemoryProbe(Callback):
    """Measures the peak memory of training steps ``start .. start + count - 1``."""

    def __init__(self, start: int = 3, count: int = 2) -> None:
        self.start, self.count = start, count
        self.peak_bytes = float("nan")
        self._prof: Any = None
        self._base = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx != self.start:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx != self.start + self.count - 1:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = float(torch.cuda.max_memory_allocated() - self._base)
        elif self._prof is not None:
            self._prof.__exit__(None, None, None)
            try:
                self.peak_bytes = _cpu_peak_bytes(self._prof)
            except Exception as err:
                warnings.warn(f"memory measurement failed: {err}", stacklevel=2)
            self._prof = None


def measure_fn_memory(step: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        return _cpu_peak_bytes(prof)
    except Exception:
        return float("nan")


# ---------------------------------------------------------------------------------------------- part 1
def lightning_run(
    name: str, kind: str, num_tasks: int, steps: int, batch_size: int, device: str
) -> tuple[float, float]:
    factory = load_strategy(name)
    assert factory is not None
    timer, probe = StepTimer(), MemoryProbe(start=min(3, steps - 3), count=2)
    model = BenchMTL(num_tasks, kind=kind, mark_representation=True)
    loader = make_loader(num_tasks, n=batch_size * 32, batch_size=batch_size, image=kind == "cnn")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp, steps, [factory(), timer, probe], device)
        trainer.fit(model, loader)
    skip = set(range(probe.start, probe.start + probe.count))
    times = [t for i, t in enumerate(timer.times) if i >= min(10, steps // 3) and i not in skip]
    return statistics.median(times), probe.peak_bytes


# ---------------------------------------------------------------------------------------------- part 2
def _ours_weighting(method: str, num_tasks: int) -> Callable[[Tensor], Tensor] | None:
    specs: dict[str, tuple[str, dict[str, Any]]] = {
        "UPGrad": ("upgrad", {}),
        "DualProj": ("dualproj", {}),
        "MGDA": ("mgda", {}),
        "CAGrad": ("cagrad", {"c": 0.4}),
        "PCGrad": ("pcgrad", {"generator": torch.Generator().manual_seed(0)}),
        "IMTL-G": ("imtl_g", {}),
        "Aligned-MTL": ("aligned_mtl", {}),
        "Nash-MTL": ("nash_mtl", {}),
        "FairGrad": ("fairgrad", {"alpha": 1.0}),
    }
    module_name, kwargs = specs[method]
    try:
        fn = getattr(
            importlib.import_module(f"lightning_mtl.functional.{module_name}"), f"{module_name}_weights"
        )
    except (ImportError, AttributeError):
        return None

    def weights(G: Tensor) -> Tensor:
        out = fn(G, **kwargs)
        return out if isinstance(out, Tensor) else out.weights

    return weights


def _torchjd_aggregator(method: str, num_tasks: int) -> Any:
    try:
        from torchjd import aggregation as A
    except ImportError:
        return None
    factories: dict[str, Callable[[], Any]] = {
        "UPGrad": lambda: A.UPGrad(),
        "DualProj": lambda: A.DualProj(),
        "MGDA": lambda: A.MGDA(),
        "CAGrad": lambda: A.CAGrad(c=0.4),
        "PCGrad": lambda: A.PCGrad(),
        "IMTL-G": lambda: A.IMTLG(),
        "Aligned-MTL": lambda: A.AlignedMTL(),
        "Nash-MTL": lambda: A.NashMTL(n_tasks=num_tasks),
        "FairGrad": lambda: A.FairGrad(alpha=1.0),
    }
    try:
        return factories[method]()
    except Exception:  # optional dependency (cvxpy) missing, API change
        return None


TORCH_METHODS = [
    "UPGrad",
    "DualProj",
    "MGDA",
    "CAGrad",
    "PCGrad",
    "IMTL-G",
    "Aligned-MTL",
    "Nash-MTL",
    "FairGrad",
]


class _Net(nn.Module):
    def __init__(self, kind: str, num_tasks: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder, hidden = build_encoder(kind)
        self.heads = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(num_tasks)])

    def losses(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        z = self.encoder(x)
        return [nn.functional.mse_loss(h(z).squeeze(1), y[:, i]) for i, h in enumerate(self.heads)], z


def torch_loop(
    kind: str, num_tasks: int, steps: int, batch_size: int, device: str, methods: list[str]
) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """``{label: (ms/step, peak bytes)}`` for the plain-loop baseline, ours and TorchJD."""
    from lightning_mtl.gradients import jacobian

    loader = make_loader(num_tasks, n=batch_size * 8, batch_size=batch_size, image=kind == "cnn")
    batches = [(x.to(device), y.to(device)) for x, y in loader]
    results: dict[str, tuple[float, float]] = {}
    skipped: list[str] = []

    def bench(
        label: str, make_step: Callable[[_Net, torch.optim.Optimizer], Callable[[Tensor, Tensor], None]]
    ):
        net = _Net(kind, num_tasks).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        step = make_step(net, opt)
        times = []
        for i in range(steps):
            x, y = batches[i % len(batches)]
            t0 = time.perf_counter()
            step(x, y)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        x, y = batches[0]
        peak = measure_fn_memory(lambda: step(x, y), device)
        results[label] = (statistics.median(times[min(10, steps // 3) :]), peak)

    def plain(net: _Net, opt: torch.optim.Optimizer):
        def step(x: Tensor, y: Tensor) -> None:
            losses, _ = net.losses(x, y)
            opt.zero_grad()
            torch.stack(losses).sum().backward()
            opt.step()

        return step

    bench("sum (baseline)", plain)
    for method in methods:
        weighting = _ours_weighting(method, num_tasks)
        if weighting is None:
            skipped.append(f"ours/{method}")
        else:

            def ours(net: _Net, opt: torch.optim.Optimizer, weighting=weighting):
                shared = [p for p in net.encoder.parameters() if p.requires_grad]

                def step(x: Tensor, y: Tensor) -> None:
                    losses, _ = net.losses(x, y)
                    stacked = torch.stack(losses)
                    J = jacobian(stacked, shared)
                    w = weighting(J @ J.T).to(stacked.dtype)
                    opt.zero_grad()
                    (w.detach() * stacked).sum().backward()
                    opt.step()

                return step

            bench(f"ours {method}", ours)
        if _torchjd_aggregator(method, num_tasks) is None:
            skipped.append(f"torchjd/{method}")
            continue

        def jd(net: _Net, opt: torch.optim.Optimizer, method=method):
            from torchjd.autojac import jac_to_grad, mtl_backward

            aggregator = _torchjd_aggregator(method, num_tasks)
            shared = list(net.encoder.parameters())

            def step(x: Tensor, y: Tensor) -> None:
                losses, z = net.losses(x, y)
                opt.zero_grad()
                mtl_backward(losses, features=z)
                jac_to_grad(shared, aggregator)
                opt.step()

            return step

        try:
            bench(f"torchjd {method}", jd)
        except Exception as err:
            skipped.append(f"torchjd/{method} ({type(err).__name__}: {str(err)[:80]})")
    return results, skipped


# ---------------------------------------------------------------------------------------------- main
def _fmt_mem(b: float) -> str:
    return "n/a" if b != b else f"{b / 2**20:.2f}"


def _ratio(a: float, b: float) -> str:
    return "n/a" if a != a or b != b or b == 0 else f"{a / b:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 2, 10; MLP; 40 steps; 1 repeat")
    parser.add_argument("--tasks", default=None, help="comma-separated task counts (default 2,10,40)")
    parser.add_argument("--models", default=None, help="comma-separated encoders: mlp, cnn (default both)")
    parser.add_argument(
        "--strategies", default=None, help=f"comma-separated subset of {', '.join(STRATEGIES)}"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 80, quick 40)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="Lightning-path repeats (default 3, quick 1)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--skip-lightning", action="store_true", help="only the plain-loop comparison")
    parser.add_argument("--skip-torchjd", action="store_true", help="only the Lightning path")
    parser.add_argument("--output", default="bench_strategies.md", help="write the Markdown tables here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for logger_name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger_name).setLevel(logging.ERROR)
    tasks = [int(t) for t in (args.tasks or ("2,10" if args.quick else "2,10,40")).split(",")]
    models = (args.models or ("mlp" if args.quick else "mlp,cnn")).split(",")
    steps = args.steps or (40 if args.quick else 80)
    repeats = args.repeats or (1 if args.quick else 3)
    names = list(STRATEGIES)
    if args.strategies:
        wanted = [s.strip() for s in args.strategies.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(STRATEGIES))
        if unknown:
            parser.error(f"unknown strategies {unknown}; choose from {names}")
        names = ["EqualWeighting"] + [s for s in wanted if s != "EqualWeighting"]
    missing = [n for n in names if load_strategy(n) is None]
    names = [n for n in names if n not in missing]

    out: list[str] = [
        f"Device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch "
        f"{args.batch_size}, {steps} steps, {repeats} repeat(s). Times are medians per training step; memory "
        "is the peak over two steps (MiB); ratios are to equal weighting (Lightning path) or to a plain "
        "summed-loss step (torch loop).\n"
    ]
    if not args.skip_lightning:
        for kind in models:
            for T in tasks:
                times: dict[str, list[float]] = {n: [] for n in names}
                mem: dict[str, float] = {}
                for r in range(repeats):
                    for n in names if r % 2 == 0 else names[::-1]:
                        t, m = lightning_run(n, kind, T, steps, args.batch_size, args.device)
                        times[n].append(t)
                        mem.setdefault(n, m)
                med = {n: statistics.median(v) for n, v in times.items()}
                best = {n: min(v) for n, v in times.items()}
                base_t, base_b, base_m = med["EqualWeighting"], best["EqualWeighting"], mem["EqualWeighting"]
                rows = [
                    [
                        n,
                        f"{med[n] * 1e3:.2f}",
                        _ratio(med[n], base_t),
                        f"{best[n] * 1e3:.2f}",
                        _ratio(best[n], base_b),
                        _fmt_mem(mem[n]),
                        _ratio(mem[n], base_m),
                    ]
                    for n in names
                ]
                header = ["strategy", "ms/step", "time vs equal", "best ms/step", "best vs equal"]
                table = markdown_table([*header, "peak MiB", "memory vs equal"], rows)
                block = f"### Lightning path: {kind.upper()}, T = {T}\n\n{table}\n"
                print(block, flush=True)
                out.append(block)
    if not args.skip_torchjd:
        for kind in models:
            for T in tasks:
                results, skipped = torch_loop(
                    kind, T, max(steps, 30), args.batch_size, args.device, TORCH_METHODS
                )
                base_t, base_m = results["sum (baseline)"]
                rows = []
                for method in TORCH_METHODS:
                    row = [method]
                    for lib in ("ours", "torchjd"):
                        t, m = results.get(f"{lib} {method}", (float("nan"), float("nan")))
                        row += [
                            "n/a" if t != t else f"{t * 1e3:.2f}",
                            _ratio(t, base_t),
                            _fmt_mem(m),
                        ]
                    rows.append(row)
                table = markdown_table(
                    [
                        "method",
                        "ours ms/step",
                        "ours vs sum",
                        "ours peak MiB",
                        "TorchJD ms/step",
                        "TorchJD vs sum",
                        "TorchJD peak MiB",
                    ],
                    rows,
                )
                block = (
                    f"### Plain torch loop, ours vs TorchJD: {kind.upper()}, T = {T} (sum baseline "
                    f"{base_t * 1e3:.2f} ms, {_fmt_mem(base_m)} MiB)\n\n{table}\n"
                )
                if skipped:
                    block += f"\nSkipped: {', '.join(skipped)}\n"
                print(block, flush=True)
                out.append(block)
    if missing:
        out.append(f"\nStrategies not available in this checkout (skipped): {', '.join(missing)}\n")
        print(out[-1])
    with open(args.output, "w") as fh:
        fh.write("\n".join(out))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
