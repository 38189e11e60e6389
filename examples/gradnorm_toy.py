"""GradNorm's synthetic regression: tasks of very different scales, balanced by learned weights.

Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks",
ICML 2018 (https://arxiv.org/abs/1711.02257), section 4. Task ``i`` regresses

    fᵢ(x) = σᵢ · tanh((B + εᵢ) x),   x ∈ ℝ²⁵⁰ (entries N(0, 1)),  fᵢ(x) ∈ ℝ¹⁰⁰,

with ``B`` and ``εᵢ`` constant matrices of i.i.d. N(0, 10) and N(0, 3.5) entries (variances): the tasks
share ``B`` but each has its own ``εᵢ``, and ``σᵢ`` sets its scale. The network is four shared 100-unit
ReLU layers and one linear head per task, trained on the MSE of each task. With equal weights, task ``i``'s
gradient on the last shared layer is proportional to ``σᵢ``, so the largest-scale task dominates; GradNorm
(``α = 0.12`` on this toy in the paper) learns weights ``wᵢ`` roughly proportional to ``1/σᵢ`` so that the
weighted gradient norms ``Gᵢ = wᵢ‖∇_W Lᵢ‖`` become similar.

    python examples/gradnorm_toy.py                           # T = 2, σ = (1, 100), as in the paper
    python examples/gradnorm_toy.py --sigmas 1,2,5,10,20,50,100,3,30,8 --steps 1500
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl import MultiTaskModule
from lightning_mtl.strategies.base import MTLStrategy
from lightning_mtl.strategies.equal import EqualWeighting
from lightning_mtl.strategies.gradnorm import GradNorm


class ToyProblem:
    """The toy's fixed functions: ``B`` (N(0, 10) entries) shared, ``εᵢ`` (N(0, 3.5)) per task, scales ``σᵢ``."""

    def __init__(self, sigmas: Sequence[float], in_dim: int = 250, out_dim: int = 100, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.sigmas = torch.tensor([float(s) for s in sigmas])
        self.B = torch.randn(out_dim, in_dim, generator=g) * 10**0.5
        self.eps = torch.randn(len(sigmas), out_dim, in_dim, generator=g) * 3.5**0.5
        self.in_dim = in_dim

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``(x [n, in_dim], y [n, T, out_dim])`` with ``y[:, i] = σᵢ tanh((B + εᵢ) x)``, x ~ N(0, I)."""
        x = torch.randn(n, self.in_dim, generator=torch.Generator().manual_seed(seed))
        y = self.sigmas[None, :, None] * torch.tanh(torch.einsum("tod,nd->nto", self.B + self.eps, x))
        return x, y


class ToyNet(MultiTaskModule):
    """Four shared 100-unit ReLU layers and a linear head per task; MSE per task."""

    def __init__(
        self, num_tasks: int, in_dim: int = 250, out_dim: int = 100, hidden: int = 100, lr: float = 1e-3
    ):
        super().__init__(tasks=[f"task{i}" for i in range(num_tasks)])
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(4):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(hidden, out_dim) for _ in range(num_tasks)])
        self.lr = lr

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        return {
            name: nn.functional.mse_loss(head(z), y[:, i])
            for i, (name, head) in enumerate(zip(self.task_names, self.heads))
        }

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def weighted_grad_norms(model: ToyNet, batch, weights: Tensor) -> Tensor:
    """``Gᵢ = wᵢ‖∇_W Lᵢ‖`` on the last shared layer's weight ``W`` for ``batch``."""
    layer = model.encoder[-2].weight
    losses = list(model.task_losses(batch, 0).values())
    norms = torch.stack([torch.autograd.grad(loss, layer, retain_graph=True)[0].norm() for loss in losses])
    return weights.detach() * norms


def train(
    problem: ToyProblem,
    strategy: MTLStrategy,
    steps: int = 300,
    batch_size: int = 100,
    n: int = 2000,
    seed: int = 0,
) -> tuple[ToyNet, Tensor]:
    """Train ``ToyNet`` with ``strategy``; returns the model and ``Gᵢ`` on a held-out batch at the end."""
    x, y = problem.sample(n, seed)
    model = ToyNet(len(problem.sigmas))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[strategy],
    )
    shuffle = torch.Generator().manual_seed(seed)
    trainer.fit(
        model, DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=shuffle)
    )
    weights = strategy.weights_tensor()
    if weights is None:
        weights = torch.ones(len(problem.sigmas))
    return model, weighted_grad_norms(model, problem.sample(batch_size, seed + 1), weights)


def spread(values: Tensor) -> float:
    """``max / min``: 1 when all equal."""
    return float(values.max() / values.min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GradNorm's synthetic toy (Chen et al. 2018, section 4)")
    parser.add_argument("--sigmas", default="1,100", help="comma-separated task scales σᵢ (paper: 1,100)")
    parser.add_argument("--alpha", type=float, default=0.12, help="GradNorm α (paper's toy: 0.12)")
    parser.add_argument("--lr", type=float, default=0.025, help="learning rate of the task weights")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    problem = ToyProblem(sigmas, seed=args.seed)
    gradnorm = GradNorm(alpha=args.alpha, lr=args.lr)
    _, g_gradnorm = train(problem, gradnorm, args.steps, args.batch_size, seed=args.seed)
    _, g_equal = train(problem, EqualWeighting(), args.steps, args.batch_size, seed=args.seed)
    w = gradnorm.params.detach()
    inverse = 1 / problem.sigmas
    inverse = inverse * len(sigmas) / inverse.sum()
    print("| task | σ | GradNorm w | T·(1/σ)/Σ(1/σ) | G (GradNorm) | G (equal weights) |")
    print("|---|---|---|---|---|---|")
    for i, s in enumerate(sigmas):
        print(f"| {i} | {s:g} | {w[i]:.4f} | {inverse[i]:.4f} | {g_gradnorm[i]:.4g} | {g_equal[i]:.4g} |")
    print(
        f"\nspread max/min of the weighted gradient norms G: GradNorm {spread(g_gradnorm):.2f}, "
        f"equal weights {spread(g_equal):.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
