"""Many tasks (issue 11, section 4): what a gradient method's step costs at T = 100, and where the time goes.

Same network as ``bench_strategies.py`` (the MLP encoder 32→64→64 + T linear heads, MSE per task, batch 32).
Three parts, all in one process:

1. **Components** on one batch: the forward + summed backward (what equal weighting back-propagates), the
   forward + ``T × P`` Jacobian of the shared parameters (one batched backward), and each method's weights
   from that Jacobian's Gramian, ours (``lightning_mtl.functional.<method>_weights``) and TorchJD 0.18's
   weighting on the same Gramian. Main-thread CPU time, median of ``--repeats``.
2. **Lightning path**: ``MultiTaskModule`` + each strategy callback in ``Trainer.fit``; median time per step
   (``bench_strategies.lightning_run``), as a ratio to ``EqualWeighting`` (target for UPGrad and DualProj:
   ≤ 3×).
3. **Plain torch loop, ours vs TorchJD** (``bench_strategies.torch_loop``): ratios to a summed-loss step.

``--profile NAME`` prints a cProfile (main-thread CPU time) of NAME's weights at T.

    python benchmarks/bench_many_tasks.py                       # T = 100, all three parts
    python benchmarks/bench_many_tasks.py --parts components    # seconds, not minutes
    python benchmarks/bench_many_tasks.py --profile upgrad
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import BenchMTL, StepTimer, build_encoder, make_loader, make_trainer, markdown_table  # noqa: E402
from bench_strategies import STRATEGIES, TORCH_METHODS, load_strategy, torch_loop  # noqa: E402

# functional module -> (kwargs, TorchJD weighting factory or None)
METHODS: dict[str, tuple[dict[str, Any], Callable[[int], Any] | None]] = {
    "upgrad": ({}, lambda T: _jd("UPGradWeighting")),
    "dualproj": ({}, lambda T: _jd("DualProjWeighting")),
    "mgda": ({}, lambda T: _jd("MGDAWeighting")),
    "cagrad": ({"c": 0.4}, lambda T: _jd("CAGradWeighting", c=0.4)),
    "pcgrad": ({"generator": None}, lambda T: _jd("PCGradWeighting")),
    "imtl_g": ({}, lambda T: _jd("IMTLGWeighting")),
    "aligned_mtl": ({}, lambda T: _jd("AlignedMTLWeighting")),
    "nash_mtl": ({}, lambda T: _jd("NashMTLWeighting", n_tasks=T)),
    "fairgrad": ({"alpha": 1.0}, lambda T: _jd("FairGradWeighting", alpha=1.0)),
    "gradvac": ({"generator": None}, lambda T: _jd("GradVacWeighting")),
}

GRADIENT_STRATEGIES = [
    "PCGrad",
    "MGDA",
    "MGDA-UB",
    "CAGrad",
    "IMTLG",
    "NashMTL",
    "UPGrad",
    "DualProj",
    "AlignedMTL",
    "FairGrad",
    "GradVac",
    "GradDrop",
    "GradNorm",
]


def _jd(name: str, **kwargs: Any) -> Any:
    try:
        return getattr(importlib.import_module("torchjd.aggregation"), name)(**kwargs)
    except Exception:  # not installed, optional solver missing, API change
        return None


def _ours(name: str) -> Callable[[Tensor], Tensor]:
    fn = getattr(importlib.import_module(f"lightning_mtl.functional.{name}"), f"{name}_weights")
    kwargs = dict(METHODS[name][0])

    def weights(G: Tensor) -> Tensor:
        if "generator" in kwargs:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        out = fn(G, **kwargs)
        return out if isinstance(out, Tensor) else out.weights

    return weights


def _cpu_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def components(num_tasks: int, batch_size: int, repeats: int) -> str:
    from lightning_mtl.gradients import jacobian
    from lightning_mtl.gradients.jacobian import split_jacobian, split_plan

    torch.manual_seed(0)
    encoder, hidden = build_encoder("mlp")
    heads = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(num_tasks)])
    x, y = next(iter(make_loader(num_tasks, n=batch_size, batch_size=batch_size)))
    shared = list(encoder.parameters())

    def losses() -> Tensor:
        z = encoder(x)
        return torch.stack([nn.functional.mse_loss(h(z).squeeze(1), y[:, i]) for i, h in enumerate(heads)])

    def through_representation() -> Tensor:  # what the engine does when the heads meet the trunk at z
        z = encoder(x)
        per_task = [nn.functional.mse_loss(h(z).squeeze(1), y[:, i]) for i, h in enumerate(heads)]
        plan = split_plan(per_task, z, shared)
        assert plan == "per_task", plan
        return split_jacobian(torch.stack(per_task), per_task, z, shared, plan)

    t_sum = _cpu_time(lambda: losses().sum().backward(), repeats)
    t_jac = _cpu_time(lambda: jacobian(losses(), shared), repeats)
    t_split = _cpu_time(through_representation, repeats)
    J = jacobian(losses(), shared)
    torch.testing.assert_close(through_representation(), J, atol=1e-5, rtol=1e-4)
    G = (J @ J.T).double()
    rows = [
        ["forward + Σ loss backward", f"{t_sum * 1e3:.2f}", "1.00", "", ""],
        ["forward + Jacobian (batched backward)", f"{t_jac * 1e3:.2f}", f"{t_jac / t_sum:.2f}", "", ""],
        [
            "forward + Jacobian through the representation (the engine's split)",
            f"{t_split * 1e3:.2f}",
            f"{t_split / t_sum:.2f}",
            "",
            "",
        ],
    ]
    for name, (_, jd_factory) in METHODS.items():
        ours = _ours(name)
        t_ours = _cpu_time(lambda ours=ours: ours(G), repeats)
        weighting = jd_factory(num_tasks) if jd_factory else None
        t_jd = float("nan")
        if weighting is not None:
            try:
                t_jd = _cpu_time(lambda weighting=weighting: weighting(G), max(1, repeats // 2))
            except Exception as err:  # e.g. an optional solver failing at this size
                print(f"TorchJD {name} failed: {type(err).__name__}: {str(err)[:80]}", flush=True)
        rows.append(
            [
                f"`{name}_weights`",
                f"{t_ours * 1e3:.2f}",
                f"{t_ours / t_sum:.2f}",
                "n/a" if t_jd != t_jd else f"{t_jd * 1e3:.2f}",
                "n/a" if t_jd != t_jd else f"{t_ours / t_jd:.2f}",
            ]
        )
    header = [
        f"component (T = {num_tasks}, P = {J.shape[1]})",
        "ms",
        "vs fwd+Σ bwd",
        "TorchJD ms",
        "ours / TorchJD",
    ]
    return markdown_table(header, rows)


def lightning_step_time(name: str, num_tasks: int, steps: int, batch_size: int) -> float:
    """Median main-thread CPU time per training step after a warm-up of ``steps // 3`` (no memory probe:
    ``bench_strategies.py`` measures memory; its profiler would dominate at T = 100)."""
    import tempfile

    factory = load_strategy(name)
    assert factory is not None
    timer = StepTimer()
    model = BenchMTL(num_tasks, kind="mlp", mark_representation=True)
    loader = make_loader(num_tasks, n=batch_size * steps, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        make_trainer(tmp, steps, [factory(), timer], "cpu").fit(model, loader)
    return statistics.median(timer.times[steps // 3 :])


def lightning_part(num_tasks: int, names: list[str], steps: int, batch_size: int, repeats: int) -> str:
    names = ["EqualWeighting"] + [n for n in names if n != "EqualWeighting" and load_strategy(n) is not None]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t = lightning_step_time(n, num_tasks, steps, batch_size)
            times[n].append(t)
            print(f"  {n}: {t * 1e3:.1f} ms/step", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    rows = [[n, f"{med[n] * 1e3:.2f}", f"{med[n] / med['EqualWeighting']:.2f}"] for n in names]
    return markdown_table(["strategy", "ms/step", "time vs equal"], rows)


def torchjd_part(num_tasks: int, steps: int, batch_size: int) -> str:
    results, skipped = torch_loop("mlp", num_tasks, steps, batch_size, "cpu", TORCH_METHODS)
    base, _ = results["sum (baseline)"]
    rows = []
    for method in TORCH_METHODS:
        ours, _ = results.get(f"ours {method}", (float("nan"), 0.0))
        jd, _ = results.get(f"torchjd {method}", (float("nan"), 0.0))

        def fmt(v: float) -> str:
            return "n/a" if v != v else f"{v:.2f}"

        rows.append(
            [method, fmt(ours * 1e3), fmt(ours / base), fmt(jd * 1e3), fmt(jd / base), fmt(ours / jd)]
        )
    table = markdown_table(
        ["method", "ours ms", "ours vs sum", "TorchJD ms", "TorchJD vs sum", "ours / TorchJD"], rows
    )
    note = f"\nsum baseline {base * 1e3:.2f} ms/step" + (
        f"; skipped: {', '.join(skipped)}" if skipped else ""
    )
    return table + note


def profile_weights(name: str, num_tasks: int, batch_size: int, top: int = 20) -> str:
    import cProfile
    import io
    import pstats

    from lightning_mtl.gradients import jacobian

    torch.manual_seed(0)
    encoder, hidden = build_encoder("mlp")
    heads = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(num_tasks)])
    x, y = next(iter(make_loader(num_tasks, n=batch_size, batch_size=batch_size)))
    z = encoder(x)
    L = torch.stack([nn.functional.mse_loss(h(z).squeeze(1), y[:, i]) for i, h in enumerate(heads)])
    J = jacobian(L, list(encoder.parameters()))
    G = (J @ J.T).double()
    ours = _ours(name)
    ours(G)
    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    for _ in range(5):
        ours(G)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100, help="number of tasks T (default 100)")
    parser.add_argument(
        "--parts",
        default="components,lightning,torchjd",
        help="comma-separated: components, lightning, torchjd",
    )
    parser.add_argument(
        "--strategies", default=None, help="Lightning-path strategies (default: every gradient-based one)"
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="steps per Lightning / torch-loop run (default 30)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="component repeats (default 5); Lightning: 1")
    parser.add_argument("--lightning-repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--profile", default=None, help="cProfile one method's weights (e.g. upgrad) and exit"
    )
    parser.add_argument("--output", default=None, help="also write the Markdown tables to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for logger_name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger_name).setLevel(logging.ERROR)
    if args.profile:
        if args.profile not in METHODS:
            parser.error(f"--profile must be one of {', '.join(METHODS)}")
        print(profile_weights(args.profile, args.tasks, args.batch_size))
        return 0
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    names = GRADIENT_STRATEGIES
    if args.strategies:
        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        unknown = sorted(set(names) - set(STRATEGIES))
        if unknown:
            parser.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out = [
        f"T = {args.tasks}, MLP, batch {args.batch_size}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {load:.1f} at start\n"
    ]
    print(out[0], flush=True)
    blocks = []
    if "components" in parts:
        blocks.append(("Components on one batch", components(args.tasks, args.batch_size, args.repeats)))
        print(blocks[-1][1], flush=True)
    if "lightning" in parts:
        table = lightning_part(args.tasks, names, args.steps, args.batch_size, args.lightning_repeats)
        blocks.append(("Lightning path", table))
        print(table, flush=True)
    if "torchjd" in parts:
        blocks.append(
            ("Plain torch loop, ours vs TorchJD", torchjd_part(args.tasks, args.steps, args.batch_size))
        )
        print(blocks[-1][1], flush=True)
    for title, table in blocks:
        out.append(f"#### {title}\n\n{table}\n")
    if hasattr(os, "getloadavg"):
        out.append(f"load average {os.getloadavg()[0]:.1f} at the end\n")
        print(out[-1])
    if args.output:
        with open(args.output, "w") as fh:
            fh.write("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
