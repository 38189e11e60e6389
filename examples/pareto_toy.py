"""The two-objective toy of the CAGrad paper (reused by Nash-MTL and FAMO): where does each method go?

Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021
(https://arxiv.org/abs/2110.14048), Fig. 1; Navon et al., "Multi-Task Learning as a Bargaining Game",
ICML 2022 (https://arxiv.org/abs/2202.01017), Fig. 1. For x ∈ ℝ²:

    h₁ = log(max(|½(−x₁−7) − tanh(−x₂)|, 5e-6)) + 6,   h₂ = log(max(|½(−x₁+3) + tanh(−x₂) + 2|, 5e-6)) + 6,
    q₁ = ((x₁−7)² + 0.1(x₂+8)²)/10 − 20,               q₂ = ((x₁+7)² + 0.1(x₂+8)²)/10 − 20,
    a = max(tanh(x₂/2), 0),  b = max(tanh(−x₂/2), 0),    L₁ = h₁a + q₁b,  L₂ = h₂a + q₂b.

Each method turns the 2×2 Jacobian into an update direction, and Adam steps x on it (the papers' setting:
lr 1e-3, 100k steps; ``--quick`` uses a larger rate and fewer steps). The run reports, per method and
start, where x ends, its Pareto stationarity (the norm of the min-norm element of the convex hull of the two
gradients: 0 on the Pareto set) and its distance to the minimiser of the average loss. The papers' claims:
MGDA and PCGrad stop at start-dependent Pareto points; CAGrad reaches the minimiser of the average loss.

    python examples/pareto_toy.py --quick                       # tens of seconds (lr 0.1, 1500 steps)
    python examples/pareto_toy.py --setting nash --plot toy.png  # Nash-MTL's starts and L₁ × 0.1
"""

from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Callable

import torch
from torch import Tensor

LOWER = 5e-6
#: starting points of the two papers
STARTS = {
    "cagrad": [(-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)],
    "nash": [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)],
}
#: loss scales of the two papers (Nash-MTL multiplies L₁ by 0.1)
SCALES = {"cagrad": (1.0, 1.0), "nash": (0.1, 1.0)}


def toy_losses(x: Tensor, scales: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """``[L₁, L₂]`` at ``x`` (``[..., 2]``), differentiable; ``scales`` multiply the two losses."""
    x1, x2 = x[..., 0], x[..., 1]
    h1 = torch.log(torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=LOWER)) + 6
    h2 = torch.log(torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=LOWER)) + 6
    q1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    q2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    a = torch.clamp(torch.tanh(x2 / 2), min=0)
    b = torch.clamp(torch.tanh(-x2 / 2), min=0)
    return torch.stack([scales[0] * (h1 * a + q1 * b), scales[1] * (h2 * a + q2 * b)], dim=-1)


def toy_jacobian(x: Tensor, scales: tuple[float, float] = (1.0, 1.0)) -> tuple[Tensor, Tensor]:
    """``(losses [..., 2], J [..., 2, 2])`` at ``x [..., 2]``, in closed form (``J[..., i, :] = ∇Lᵢ``).

    Equal to autograd of :func:`toy_losses` (the tests check it), and several times cheaper.
    """
    x = x.detach()
    x1, x2 = x[..., 0], x[..., 1]
    sech2 = 1 - torch.tanh(x2) ** 2  # d tanh(x₂)/dx₂; tanh(−x₂) = −tanh(x₂)
    u1 = 0.5 * (-x1 - 7) + torch.tanh(x2)
    u2 = 0.5 * (-x1 + 3) - torch.tanh(x2) + 2
    # clamp's derivative, as autograd's: 1 where the input is >= the bound (also exactly at it)
    live1, live2 = (u1.abs() >= LOWER).to(x.dtype), (u2.abs() >= LOWER).to(x.dtype)
    h1 = torch.log(torch.clamp(u1.abs(), min=LOWER)) + 6
    h2 = torch.log(torch.clamp(u2.abs(), min=LOWER)) + 6
    dh1 = torch.stack([-0.5 / u1, sech2 / u1], -1) * live1[..., None]  # d log|u| = du / u
    dh2 = torch.stack([-0.5 / u2, -sech2 / u2], -1) * live2[..., None]
    q1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    q2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    dq1 = torch.stack([(x1 - 7) / 5, (x2 + 8) / 50], -1)
    dq2 = torch.stack([(x1 + 7) / 5, (x2 + 8) / 50], -1)
    t = torch.tanh(x2 / 2)
    a, b = torch.clamp(t, min=0), torch.clamp(-t, min=0)
    dt = 0.5 * (1 - t**2)
    da = torch.where(t >= 0, dt, torch.zeros_like(dt))  # at x₂ = 0 both a and b pass the gradient (autograd's
    db = torch.where(
        t <= 0, -dt, torch.zeros_like(dt)
    )  # clamp), so the start (0, 0) is not a stationary point
    zero = torch.zeros_like(x1)
    d_ab_1 = torch.stack([zero, h1 * da + q1 * db], -1)  # the terms from a(x₂), b(x₂)
    d_ab_2 = torch.stack([zero, h2 * da + q2 * db], -1)
    g1 = a[..., None] * dh1 + b[..., None] * dq1 + d_ab_1
    g2 = a[..., None] * dh2 + b[..., None] * dq2 + d_ab_2
    losses = torch.stack([scales[0] * (h1 * a + q1 * b), scales[1] * (h2 * a + q2 * b)], -1)
    return losses, torch.stack([scales[0] * g1, scales[1] * g2], -2)


def pareto_stationarity(J: Tensor) -> float:
    """‖min-norm element of conv{g₁, g₂}‖ (closed form for two gradients): 0 on the Pareto set."""
    g1, g2 = J[0].double(), J[1].double()
    diff = g1 - g2
    denom = float(diff @ diff)
    gamma = 1.0 if denom == 0 else min(max(float((g2 - g1) @ g2) / denom, 0.0), 1.0)
    return float((gamma * g1 + (1 - gamma) * g2).norm())


def average_loss_minimiser(scales: tuple[float, float] = (1.0, 1.0), grid: int = 401) -> Tensor:
    """The minimiser of ``(L₁ + L₂)/2`` on [−10, 10]²: the best grid point, refined by L-BFGS."""
    axis = torch.linspace(-10, 10, grid, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    pts = torch.stack([xx, yy], -1).reshape(-1, 2)
    best = pts[toy_losses(pts, scales).mean(-1).argmin()].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([best], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        value = toy_losses(best, scales).mean()
        value.backward()
        return value

    opt.step(closure)
    return best.detach().float()


# ---------------------------------------------------------------------------------------------- methods
def _functional(name: str) -> Callable[..., Tensor] | None:
    try:
        module = importlib.import_module(f"lightning_mtl.functional.{name}")
    except ImportError:
        return None
    return getattr(module, name, None)


def available_methods(seed: int = 0) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """``name -> direction(J, losses)`` for gradient descent on the mean and every method that has landed in
    :mod:`lightning_mtl.functional` (missing ones are skipped). Hyper-parameters are the toy's where a paper
    states them (CAGrad ``c = 0.5`` with the toy script's ``d/(1+c)`` rescaling)."""
    methods: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"gd": lambda J, L: J.mean(0)}
    generator = torch.Generator().manual_seed(seed)
    options: dict[str, dict] = {
        "mgda": {},
        "pcgrad": {"generator": generator},
        "cagrad": {"c": 0.5, "rescale": 2},
        "imtl_g": {},
        "nash_mtl": {},
        "upgrad": {},
        "dualproj": {},
        "aligned_mtl": {},
        "fairgrad": {},
    }
    for name, kwargs in options.items():
        fn = _functional(name)
        if fn is not None:
            methods[name] = lambda J, L, fn=fn, kw=kwargs: fn(J, **kw)
    return methods


def run(
    method: Callable[[Tensor, Tensor], Tensor],
    starts: list[tuple[float, float]],
    steps: int,
    lr: float,
    scales: tuple[float, float] = (1.0, 1.0),
    cosine: bool = False,
    record_every: int = 0,
) -> tuple[Tensor, list[Tensor]]:
    """Adam on every start at once (``x [S, 2]``; Adam is element-wise, so the runs are independent),
    following ``method``'s direction; ``cosine`` decays the rate to 0. Returns ``x [S, 2]`` and the path."""
    x = torch.tensor(starts, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    path = [x.detach().clone()]
    for step in range(steps):
        losses, J = toy_jacobian(x, scales)
        x.grad = torch.stack([method(J[k], losses[k]).to(x.dtype) for k in range(len(starts))]).detach()
        opt.step()
        if sched is not None:
            sched.step()
        if record_every and step % record_every == 0:
            path.append(x.detach().clone())
    path.append(x.detach().clone())
    return x.detach(), path


def run_famo(
    starts: list[tuple[float, float]],
    steps: int,
    lr: float,
    scales: tuple[float, float] = (0.1, 1.0),
    min_losses: tuple[float, float] | None = None,
    logits_lr: float = 0.025,
    weight_decay: float = 1e-3,
    cosine: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """FAMO on every start at once: Adam on ``x`` along ``Σ wᵢ∇Lᵢ`` (FAMO's effective weights), then the logits'
    private Adam step (``logits_lr``, ``weight_decay``) on the change of the log-losses over the step, as in the
    authors' toy (``min_losses`` default ``(−21·s₁, −21)``: the toy's losses are negative). Returns ``x`` and the
    path."""
    from lightning_mtl.functional import famo_effective_weights, famo_logits_grad

    lower = torch.tensor(min_losses if min_losses is not None else (-21 * scales[0], -21.0 * scales[1]))
    x = torch.tensor(starts, dtype=torch.float32, requires_grad=True)
    logits = torch.zeros(len(starts), 2, requires_grad=True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    logits_opt = torch.optim.Adam([logits], lr=logits_lr, weight_decay=weight_decay)
    path = [x.detach().clone()]
    for _ in range(steps):
        before, J = toy_jacobian(x, scales)
        w = torch.stack(
            [famo_effective_weights(logits[k].detach(), before[k], lower) for k in range(len(starts))]
        )
        x.grad = torch.einsum("st,stp->sp", w, J).detach()
        opt.step()
        if sched is not None:
            sched.step()
        after = toy_losses(x.detach(), scales)
        logits.grad = torch.stack(
            [famo_logits_grad(logits[k].detach(), before[k], after[k], lower) for k in range(len(starts))]
        )
        logits_opt.step()
    path.append(x.detach().clone())
    return x.detach(), path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CAGrad / Nash-MTL two-objective toy")
    parser.add_argument("--setting", choices=["cagrad", "nash"], default="cagrad")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps (paper: 100k cagrad, 35k nash)")
    parser.add_argument("--lr", type=float, default=None, help="Adam lr (paper: 1e-3)")
    parser.add_argument(
        "--quick", action="store_true", help="lr 0.1 with cosine decay, 1500 steps (the tests' setting)"
    )
    parser.add_argument("--cosine", action="store_true", help="cosine decay of the rate to 0")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the available methods")
    parser.add_argument(
        "--plot", default=None, help="save the trajectories over the average-loss contour here"
    )
    args = parser.parse_args(argv)
    paper_steps = 100_000 if args.setting == "cagrad" else 35_000
    steps = args.steps or (1500 if args.quick else paper_steps)
    lr = args.lr or (0.1 if args.quick else 1e-3)
    args.cosine = args.cosine or args.quick
    scales = SCALES[args.setting]
    methods = available_methods()
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        missing = sorted(set(wanted) - set(methods))
        if missing:
            parser.error(f"methods {missing} are not available; available: {sorted(methods)}")
        methods = {m: methods[m] for m in wanted}
    target = average_loss_minimiser(scales)
    print(
        f"setting {args.setting}: Adam lr {lr}, {steps} steps; average-loss minimiser x* = {target.tolist()}"
    )
    print("| method | start | end | L₁, L₂ | Pareto stationarity | ‖x − x*‖ |")
    print("|---|---|---|---|---|---|")
    paths: dict[str, list[Tensor]] = {}
    for name, method in methods.items():
        starts = STARTS[args.setting]
        ends, path = run(method, starts, steps, lr, scales, args.cosine, record_every=max(1, steps // 400))
        paths[name] = path
        for start, end in zip(starts, ends):
            losses, J = toy_jacobian(end, scales)
            stat = pareto_stationarity(J)
            dist = float((end - target).norm())
            print(
                f"| {name} | {start} | ({end[0]:.3f}, {end[1]:.3f}) | {losses[0]:.3f}, {losses[1]:.3f} | "
                f"{stat:.2e} | {dist:.3f} |"
            )
    if args.plot:
        _plot(paths, target, scales, args.plot)
    return 0


def _plot(paths: dict[str, list[Tensor]], target: Tensor, scales: tuple[float, float], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = torch.linspace(-10, 10, 300)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    zz = toy_losses(torch.stack([xx, yy], -1), scales).mean(-1)
    cols = min(4, len(paths))
    rows = math.ceil(len(paths) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax, (name, path) in zip(axes.flat, paths.items()):
        ax.contour(xx, yy, zz, levels=30, linewidths=0.5)
        p = torch.stack(path)  # [steps, S, 2]
        for k in range(p.shape[1]):
            ax.plot(p[:, k, 0], p[:, k, 1], lw=1.5)
            ax.plot(p[0, k, 0], p[0, k, 1], "k.")
        ax.plot(target[0], target[1], "r*", ms=12)
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"saved {out}")


if __name__ == "__main__":
    raise SystemExit(main())
