"""GPU suite (issue 11, section 5): a ResNet-18 trunk on 3×64×64 inputs, T = 2, 10, 40 linear heads, batch 64,
fp32 / bf16 / 16-mixed: step time and peak memory of every strategy, against equal weighting and TorchJD,
in the same process.

Two parts per (T, precision):

1. **Lightning path**: ``MultiTaskModule`` + each strategy of ``lightning_mtl.strategies`` (built with its
   defaults; the representation is marked, so ``GradDrop`` and ``MGDA(mode="representation")`` run) in
   ``Trainer.fit`` with ``precision`` = ``32-true`` / ``bf16-mixed`` / ``16-mixed``. Time per step: median
   wall time (after ``torch.cuda.synchronize``; on the CPU, main-thread CPU time) of the steps after a
   warm-up (``--repeats N``: N interleaved runs per strategy, their median and best); peak memory:
   ``torch.cuda.max_memory_allocated`` over two steps, minus what was allocated before them. Ratios are to
   ``EqualWeighting`` in the same run.
2. **Plain torch loop, ours vs TorchJD**: one hand-written step for both libraries on the same model and batch
   under the same autocast (``bf16`` / ``fp16``; no gradient scaler for either library, so the two do the
   same work): ours is the Jacobian of the shared trunk, the method's weights from its Gramian and one
   backward of ``Σ wᵢLᵢ``; TorchJD 0.18 is ``mtl_backward(losses, features=z)`` + ``jac_to_grad``. Ratios
   are to a plain summed-loss step.

The ResNet-18 is built here from ``torch.nn`` (no torchvision, no download): the ImageNet stem (7×7 conv,
stride 2, max-pool), four stages of two basic blocks (64, 128, 256, 512 channels), global average pooling:
11.2 M shared parameters, 512 features. Each task is a ``Linear(512, 1)`` head with an MSE loss on random
targets.

Without CUDA the script prints why and exits 0. ``--device cpu --quick`` runs a tiny configuration on the
CPU (width 8, 16×16 inputs, T = 2, batch 6, 3 steps, fp32, three strategies): the smoke test of the code path.

    python benchmarks/bench_gpu.py --output bench_gpu.md                     # the full suite (long)
    python benchmarks/bench_gpu.py --tasks 10 --precisions bf16 --strategies UPGrad,PCGrad
    python benchmarks/bench_gpu.py --device cpu --quick
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
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import markdown_table  # noqa: E402

from lightning_mtl import MultiTaskModule  # noqa: E402

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed", "16-mixed": "16-mixed"}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}
QUICK_STRATEGIES = ("EqualWeighting", "UPGrad", "GradDrop")


# ---------------------------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def resnet18_trunk(width: int = 64) -> tuple[nn.Module, int]:
    """ResNet-18 without its classifier (He et al. 2016): ``[B, 3, H, W]`` → ``[B, 8·width]``."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    cin = width
    for i, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), cin


class ResNetMTL(MultiTaskModule):
    def __init__(self, num_tasks: int, width: int) -> None:
        super().__init__(tasks=[f"t{i}" for i in range(num_tasks)])
        torch.manual_seed(0)
        self.encoder, features = resnet18_trunk(width)
        self.heads = nn.ModuleList([nn.Linear(features, 1) for _ in range(num_tasks)])

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        z = self.shared_representation(self.encoder(x))
        return {
            name: nn.functional.mse_loss(head(z).squeeze(1).float(), y[:, i])
            for i, (name, head) in enumerate(zip(self.task_names, self.heads))
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


def make_loader(num_tasks: int, batch_size: int, steps: int, size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * steps, 3, size, size, generator=g)
    y = torch.randn(batch_size * steps, num_tasks, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, drop_last=True)


# ---------------------------------------------------------------------------------------------- part 1
class Probe(Callback):
    """Wall time per step (synchronised on CUDA) and peak CUDA memory of steps ``start, start + 1``."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.times: list[float] = []
        self.peak = float("nan")
        self._t0 = 0.0
        self._base = 0

    def _sync(self, module: Any) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    @staticmethod
    def _clock(module: Any) -> float:
        return time.perf_counter() if module.device.type == "cuda" else time.thread_time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._sync(pl_module)
        if batch_idx == self.start and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        self._t0 = self._clock(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._sync(pl_module)
        self.times.append(self._clock(pl_module) - self._t0)
        if batch_idx == self.start + 1 and pl_module.device.type == "cuda":
            self.peak = float(torch.cuda.max_memory_allocated() - self._base)


def lightning_run(
    factory: Callable[[], Any], num_tasks: int, precision: str, args: argparse.Namespace, batch_size: int
) -> tuple[float, float]:
    import lightning.pytorch as pl

    model = ResNetMTL(num_tasks, args.width)
    probe = Probe(start=min(3, args.steps - 2))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator=args.device,
            devices=1,
            precision=PRECISIONS[precision],
            max_steps=args.steps,
            max_epochs=-1,
            logger=False,
            default_root_dir=tmp,
            callbacks=[factory(), probe],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, make_loader(num_tasks, batch_size, args.steps, args.size))
    warm = max(1, args.steps // 3)
    return statistics.median(probe.times[warm:]), probe.peak


def strategy_factories(names: list[str] | None) -> tuple[dict[str, Callable[[], Any]], list[str]]:
    """Every strategy of the package with its defaults (plus MGDA-UB), or the named subset; and what is skipped."""
    from lightning_mtl.cli.registry import available_strategies

    available = available_strategies()
    factories: dict[str, Callable[[], Any]] = {"EqualWeighting": available["EqualWeighting"]}
    skipped = []
    for name, cls in sorted(available.items()):
        if name == "DTP":
            skipped.append("DTP (needs a metric per task)")
            continue
        factories[name] = cls
    if "MGDA" in available:
        factories["MGDA-UB"] = lambda: available["MGDA"](mode="representation")
    if names:
        unknown = sorted(set(names) - set(factories) - {"DTP"})
        if unknown:
            raise SystemExit(f"unknown strategies {unknown}; choose from {', '.join(factories)}")
        factories = {n: f for n, f in factories.items() if n == "EqualWeighting" or n in names}
    return factories, skipped


def lightning_part(num_tasks: int, precision: str, args: argparse.Namespace) -> str:
    factories, skipped = strategy_factories(args.strategy_list)
    times: dict[str, list[float]] = {name: [] for name in factories}
    memory: dict[str, float] = {}
    failed: dict[str, str] = {}
    batches = {
        name: args.batch_size
        - args.batch_size % (getattr(f(), "batch_parts", 1) if name != "EqualWeighting" else 1)
        for name, f in factories.items()  # MoDo/SDMGrad split the batch into 2 or 3
    }
    order = list(factories)
    for r in range(args.repeats):  # interleaved, in reverse order every other repeat
        for name in order if r % 2 == 0 else order[::-1]:
            if name in failed:
                continue
            try:
                t, m = lightning_run(factories[name], num_tasks, precision, args, batches[name])
            except Exception as err:  # one strategy failing must not lose the others' numbers
                failed[name] = f"{type(err).__name__}: {str(err)[:60]}"
                print(f"  {name}: {type(err).__name__}: {err}", flush=True)
                continue
            times[name].append(t)
            memory.setdefault(name, m)
            print(f"  {name}: {t * 1e3:.2f} ms/step, {_mib(m)} MiB", flush=True)
    base = times.get("EqualWeighting") or [float("nan")]
    base_t, base_b, base_m = statistics.median(base), min(base), memory.get("EqualWeighting", float("nan"))
    rows = []
    for name in order:
        label = name + ("" if batches[name] == args.batch_size else f" (batch {batches[name]})")
        if name in failed:
            rows.append([label, "error", "", "", "", "", failed[name]])
            continue
        t, b, m = statistics.median(times[name]), min(times[name]), memory[name]
        rows.append(
            [
                label,
                f"{t * 1e3:.2f}",
                _ratio(t, base_t),
                f"{b * 1e3:.2f}",
                _ratio(b, base_b),
                _mib(m),
                _ratio(m, base_m),
            ]
        )
    header = [
        "strategy",
        "ms/step",
        "time vs equal",
        "best ms/step",
        "best vs equal",
        "peak MiB",
        "memory vs equal",
    ]
    table = markdown_table(header, rows)
    return table + (f"\n\nSkipped: {', '.join(skipped)}" if skipped else "")


# ---------------------------------------------------------------------------------------------- part 2
def torch_part(num_tasks: int, precision: str, args: argparse.Namespace) -> str:
    from bench_strategies import TORCH_METHODS, _ours_weighting, _torchjd_aggregator

    from lightning_mtl.gradients import jacobian

    device = torch.device(args.device)
    loader = make_loader(num_tasks, args.batch_size, 4, args.size)
    batches = [(x.to(device), y.to(device)) for x, y in loader]
    dtype = AUTOCAST[precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    def forward(net: ResNetMTL, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        with autocast():
            z = net.encoder(x)
            losses = [
                nn.functional.mse_loss(h(z).squeeze(1).float(), y[:, i]) for i, h in enumerate(net.heads)
            ]
        return losses, z

    def bench(make_step: Callable[[ResNetMTL, torch.optim.Optimizer], Callable[[Tensor, Tensor], None]]):
        net = ResNetMTL(num_tasks, args.width).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        step = make_step(net, opt)
        times = []
        for i in range(args.steps):
            x, y = batches[i % len(batches)]
            _sync(device)
            t0 = _clock(device)
            step(x, y)
            _sync(device)
            times.append(_clock(device) - t0)
        peak = float("nan")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(*batches[0])
            torch.cuda.synchronize()
            peak = float(torch.cuda.max_memory_allocated() - base)
        return statistics.median(times[max(1, args.steps // 3) :]), peak

    def plain(net, opt):
        def step(x, y):
            losses, _ = forward(net, x, y)
            opt.zero_grad()
            torch.stack(losses).sum().backward()
            opt.step()

        return step

    base_t, base_m = bench(plain)
    rows = []
    methods = [m for m in TORCH_METHODS if not args.strategy_list or _method_selected(m, args.strategy_list)]
    for method in methods:
        row = [method]
        weighting = _ours_weighting(method, num_tasks)
        if weighting is None:
            row += ["n/a"] * 3
        else:

            def ours(net, opt, weighting=weighting):
                shared = list(net.encoder.parameters())

                def step(x, y):
                    losses, _ = forward(net, x, y)
                    stacked = torch.stack(losses)
                    J = jacobian(stacked, shared)
                    w = weighting(J @ J.T).to(stacked.dtype)
                    opt.zero_grad()
                    (w.detach() * stacked).sum().backward()
                    opt.step()

                return step

            t, m = bench(ours)
            row += [f"{t * 1e3:.2f}", _ratio(t, base_t), _mib(m)]
        aggregator = _torchjd_aggregator(method, num_tasks)
        if aggregator is None:
            row += ["n/a"] * 3
        else:

            def jd(net, opt, method=method):
                from torchjd.autojac import jac_to_grad, mtl_backward

                agg = _torchjd_aggregator(method, num_tasks)
                shared = list(net.encoder.parameters())

                def step(x, y):
                    losses, z = forward(net, x, y)
                    opt.zero_grad()
                    mtl_backward(losses, features=z)
                    jac_to_grad(shared, agg)
                    opt.step()

                return step

            try:
                t, m = bench(jd)
                row += [f"{t * 1e3:.2f}", _ratio(t, base_t), _mib(m)]
            except Exception as err:
                row += ["error", f"{type(err).__name__}", ""]
        rows.append(row)
        print(f"  {' | '.join(row)}", flush=True)
    header = [
        "method",
        "ours ms",
        "ours vs sum",
        "ours peak MiB",
        "TorchJD ms",
        "TorchJD vs sum",
        "TorchJD peak MiB",
    ]
    return f"sum baseline {base_t * 1e3:.2f} ms/step, {_mib(base_m)} MiB\n\n" + markdown_table(header, rows)


def _method_selected(method: str, names: list[str]) -> bool:
    key = method.replace("-", "").lower()
    return any(key == n.replace("-", "").lower() for n in names)


# ---------------------------------------------------------------------------------------------- main
def _clock(device: torch.device) -> float:
    """Wall time on CUDA (after a synchronisation); main-thread CPU time on the CPU (robust to a busy machine)."""
    return time.perf_counter() if device.type == "cuda" else time.thread_time()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _mib(b: float) -> str:
    return "n/a" if b != b else f"{b / 2**20:.1f}"


def _ratio(a: float, b: float) -> str:
    return "n/a" if a != a or b != b or b == 0 else f"{a / b:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--quick", action="store_true", help="tiny configuration (width 8, 16×16, T = 2, fp32)"
    )
    parser.add_argument("--tasks", default=None, help="comma-separated task counts (default 2,10,40)")
    parser.add_argument(
        "--precisions", default=None, help=f"comma-separated subset of {', '.join(PRECISIONS)}"
    )
    parser.add_argument("--strategies", default=None, help="comma-separated strategy names (default: all)")
    parser.add_argument("--parts", default="lightning,torchjd", help="comma-separated: lightning, torchjd")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 30, quick 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64, quick 6")
    parser.add_argument("--width", type=int, default=None, help="ResNet base width (default 64, quick 8)")
    parser.add_argument("--size", type=int, default=None, help="input height = width (default 64, quick 16)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Lightning-path runs per strategy, interleaved (median and best)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default torch's; on the CPU use 1: the clock is the main thread's CPU time)",
    )
    parser.add_argument("--output", default=None, help="also write the Markdown tables to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device available; skipping (use --device cpu --quick for a CPU smoke run).")
        return 0
    quick = args.quick
    args.steps = args.steps or (3 if quick else 30)
    args.batch_size = args.batch_size or (6 if quick else 64)
    args.width = args.width or (8 if quick else 64)
    args.size = args.size or (16 if quick else 64)
    tasks = [int(t) for t in (args.tasks or ("2" if quick else "2,10,40")).split(",")]
    precisions = (args.precisions or ("fp32" if quick else "fp32,bf16,16-mixed")).split(",")
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"unknown precisions {unknown}; choose from {', '.join(PRECISIONS)}")
    names = args.strategies.split(",") if args.strategies else (list(QUICK_STRATEGIES) if quick else None)
    args.strategy_list = [n.strip() for n in names if n.strip()] if names else None
    parts = {p.strip() for p in args.parts.split(",")}
    if args.device == "cpu" and "16-mixed" in precisions:
        parser.error("16-mixed needs CUDA (Lightning has no float16 autocast on the CPU)")

    warnings.filterwarnings("ignore")
    for logger_name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger_name).setLevel(logging.ERROR)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    trunk, _ = resnet18_trunk(args.width)
    params = sum(p.numel() for p in trunk.parameters())
    out = [
        f"{card}, torch {torch.__version__}, ResNet-18 trunk (width {args.width}, {params / 1e6:.2f} M shared "
        f"parameters) on 3×{args.size}×{args.size}, batch {args.batch_size}, {args.steps} steps, "
        f"{torch.get_num_threads()} torch thread(s); times are "
        "medians after a warm-up, memory is the peak over two steps.\n"
    ]
    print(out[0], flush=True)
    for T in tasks:
        for precision in precisions:
            if "lightning" in parts:
                print(f"Lightning path: T = {T}, {precision}", flush=True)
                table = lightning_part(T, precision, args)
                out.append(f"#### Lightning path: T = {T}, {precision}\n\n{table}\n")
            if "torchjd" in parts:
                print(f"Plain torch loop: T = {T}, {precision}", flush=True)
                table = torch_part(T, precision, args)
                out.append(f"#### Plain torch loop, ours vs TorchJD: T = {T}, {precision}\n\n{table}\n")
            print(out[-1], flush=True)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write("\n".join(out))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
