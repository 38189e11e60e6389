"""The papers' reference toys (examples/gradnorm_toy.py, examples/pareto_toy.py), short versions."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import gradnorm_toy  # noqa: E402
import pareto_toy  # noqa: E402

from lightning_mtl.strategies.equal import EqualWeighting  # noqa: E402
from lightning_mtl.strategies.gradnorm import GradNorm  # noqa: E402


@pytest.fixture
def one_thread():
    """Small matrices: one intra-op thread is as fast, and far faster on a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ---------------------------------------------------------------------------------------------- GradNorm
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("one_thread")
def test_gradnorm_toy_balances_gradient_norms_and_orders_weights_inversely_to_scale():
    sigmas = [1.0, 10.0, 100.0]
    problem = gradnorm_toy.ToyProblem(sigmas, seed=0)
    gradnorm = GradNorm(alpha=0.12, lr=0.025)
    _, g_gradnorm = gradnorm_toy.train(problem, gradnorm, steps=150, batch_size=50, n=1000)
    _, g_equal = gradnorm_toy.train(problem, EqualWeighting(), steps=150, batch_size=50, n=1000)
    w = gradnorm.params.detach()
    # equal weights: the σ = 100 task's gradient dominates by about two orders of magnitude
    assert gradnorm_toy.spread(g_equal) > 20
    # GradNorm: the weighted norms end up within a small factor of each other
    assert gradnorm_toy.spread(g_gradnorm) < 0.2 * gradnorm_toy.spread(g_equal)
    assert gradnorm_toy.spread(g_gradnorm) < 4
    # weights in the inverse order of the scales, summing to T
    assert w[0] > w[1] > w[2] > 0
    assert w.sum().item() == pytest.approx(3.0, abs=1e-4)
    assert w[0] / w[2] > 10


# ---------------------------------------------------------------------------------------------- Pareto toy
def test_closed_form_jacobian_matches_autograd():
    x = (torch.randn(200, 2, generator=torch.Generator().manual_seed(0)) * 6).double()
    for scales in pareto_toy.SCALES.values():
        losses, J = pareto_toy.toy_jacobian(x, scales)
        xr = x.clone().requires_grad_(True)
        ref = pareto_toy.toy_losses(xr, scales)
        for i in range(2):
            (g,) = torch.autograd.grad(ref[:, i].sum(), xr, retain_graph=True)
            torch.testing.assert_close(J[:, i], g)
        torch.testing.assert_close(losses, ref.detach())


def test_pareto_stationarity_is_zero_for_opposite_gradients_only():
    assert pareto_toy.pareto_stationarity(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(0.0)
    assert pareto_toy.pareto_stationarity(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.5**0.5)


def _method(name: str):
    methods = pareto_toy.available_methods()
    if name not in methods:
        pytest.skip(f"lightning_mtl.functional.{name} has not landed")
    return methods[name]


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("one_thread")
def test_cagrad_reaches_the_average_loss_minimiser_from_the_papers_starts():
    # the paper: c = 0.5, Adam lr 1e-3, 100k steps; here lr 0.1 with cosine decay, 1500 steps
    starts = pareto_toy.STARTS["cagrad"]
    ends, _ = pareto_toy.run(_method("cagrad"), starts, steps=1500, lr=0.1, cosine=True)
    target = pareto_toy.average_loss_minimiser()
    best = pareto_toy.toy_losses(target).mean().item()
    for start, end in zip(starts, ends):
        avg = pareto_toy.toy_losses(end).mean().item()
        assert avg - best < 0.1, (start, end.tolist(), avg, best)
        assert (end - target).norm() < 1.0, (start, end.tolist(), target.tolist())


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("one_thread")
def test_mgda_stops_on_the_pareto_front():
    starts = pareto_toy.STARTS["cagrad"]
    ends, _ = pareto_toy.run(_method("mgda"), starts, steps=1000, lr=0.15, cosine=True)
    for start, end in zip(starts, ends):
        _, J = pareto_toy.toy_jacobian(end)
        assert pareto_toy.pareto_stationarity(J) < 1e-2, (start, end.tolist())
    # start-dependent Pareto points, not all the average-loss minimiser
    target = pareto_toy.average_loss_minimiser()
    assert max(float((end - target).norm()) for end in ends) > 1.0


def test_closed_form_jacobian_matches_autograd_at_the_kinks():
    # x₂ = 0 (where a and b switch on): autograd's clamp passes the gradient there, so must the closed form
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [-8.5, 0.0]], dtype=torch.float64)
    losses, J = pareto_toy.toy_jacobian(x, pareto_toy.SCALES["nash"])
    xr = x.clone().requires_grad_(True)
    ref = pareto_toy.toy_losses(xr, pareto_toy.SCALES["nash"])
    for i in range(2):
        (g,) = torch.autograd.grad(ref[:, i].sum(), xr, retain_graph=True)
        torch.testing.assert_close(J[:, i], g)


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_thread")
def test_famo_reaches_the_pareto_front_from_every_start():
    # FAMO's paper (Fig. 1, the Nash-MTL setting: L₁ × 0.1, five starts, min losses −21·s): every run ends on
    # the Pareto front, x₂ ≈ −8.3. The paper: Adam lr 1e-3, 50k steps; here lr 0.05 with cosine decay, 3000 steps.
    starts = pareto_toy.STARTS["nash"]
    ends, _ = pareto_toy.run_famo(starts, steps=3000, lr=0.05, cosine=True)
    for start, end in zip(starts, ends):
        _, J = pareto_toy.toy_jacobian(end, pareto_toy.SCALES["nash"])
        assert pareto_toy.pareto_stationarity(J) < 2e-2, (start, end.tolist())
        assert abs(float(end[1]) + 8.3) < 0.4, (start, end.tolist())


class _PerStart:
    """A stateful direction (MoDo's λ, SDMGrad's w) kept per start: ``pareto_toy.run`` asks each start in turn."""

    def __init__(self, starts: int, step) -> None:
        self.state: list = [None] * starts
        self.k = 0
        self.step = step

    def __call__(self, J: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        k, self.k = self.k, (self.k + 1) % len(self.state)
        d, self.state[k] = self.step(J.double(), self.state[k])
        return d


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method", ["modo", "sdmgrad"])
def test_modo_and_sdmgrad_reach_the_pareto_front_on_the_shared_toy(method):
    # the two-objective toy of CAGrad / Nash-MTL / FAMO, from CAGrad's starts; deterministic (every "sample" is the
    # same Jacobian), so the double-sampling estimates are exact: MoDo's λ tracks MGDA's min-norm weights and
    # SDMGrad's direction is CAGrad-like (λ = 0.3 towards the mean gradient); both stop where a convex combination
    # of the gradients vanishes (Pareto-stationary, on the front x₂ ≈ −8.3). Adam lr 0.15 with cosine decay.
    from lightning_mtl.functional.modo import modo_direction
    from lightning_mtl.functional.sdmgrad import sdmgrad_direction

    starts = pareto_toy.STARTS["cagrad"]
    if method == "modo":
        step = _PerStart(
            len(starts), lambda J, lam: modo_direction(torch.stack([J, J]), lam, gamma=0.1, rho=0.0)
        )
    else:
        step = _PerStart(len(starts), lambda J, w: sdmgrad_direction(torch.stack([J, J, J]), w, lam=0.3)[:2])
    ends, _ = pareto_toy.run(step, starts, steps=800, lr=0.15, cosine=True)
    for start, end in zip(starts, ends):
        _, J = pareto_toy.toy_jacobian(end)
        assert pareto_toy.pareto_stationarity(J) < 2e-2, (start, end.tolist())
        assert abs(float(end[1]) + 8.3) < 0.4, (start, end.tolist())
