"""Nash-MTL on hand-computed cases and its solver's contract."""

import math

import pytest
import torch

from lightning_mtl.functional.gradient_methods import cap_update_norm, nash_mtl, nash_mtl_weights


def test_orthogonal_gradients() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    # G = diag(1, 4): α₁·1 = 1/α₁ → α₁ = 1; 4α₂ = 1/α₂ → α₂ = ½; d = (1, 1), ‖d‖ = √T = √2
    weights, converged = nash_mtl_weights(J @ J.T)
    assert converged
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.5], dtype=torch.float64))
    result = nash_mtl(J)
    torch.testing.assert_close(result.update, torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(result.weights, weights)


def test_solution_satisfies_the_bargaining_equation_at_any_scale() -> None:
    J = torch.randn(5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for scale in (1e-8, 1.0, 1e8):
        G = (scale * J) @ (scale * J).T
        weights, converged = nash_mtl_weights(G)
        assert converged
        torch.testing.assert_close(weights * (G @ weights), torch.ones(5, dtype=torch.float64))
        assert (weights @ G @ weights).item() == pytest.approx(5.0)  # ‖Jᵀα‖² = T


def test_warm_start_converges_faster_to_the_same_weights() -> None:
    J = torch.randn(6, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    G = J @ J.T
    cold, _ = nash_mtl_weights(G, max_iter=50, tol=1e-12)
    warm, converged = nash_mtl_weights(G, previous=cold * 1.01, max_iter=3, tol=1e-10)
    assert converged
    torch.testing.assert_close(warm, cold)


def test_no_solution_is_reported_not_hidden() -> None:
    # g₂ = −g₁: α₁g₁ + α₂g₂ can vanish with α > 0, so Gα = 1/α has no solution
    J = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    weights, converged = nash_mtl_weights(J @ J.T)
    assert not converged
    assert torch.isfinite(weights).all() and (weights > 0).all()
    # a zero gradient: its weight grows without bound, the update stays finite
    J = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    result = nash_mtl(J)
    assert not result.converged
    torch.testing.assert_close(result.update, J[0] / J[0].norm())


def test_all_zero_gradients_return_the_previous_weights() -> None:
    previous = torch.tensor([0.3, 0.7], dtype=torch.float64)
    weights, converged = nash_mtl_weights(torch.zeros(2, 2, dtype=torch.float64), previous=previous)
    assert not converged
    torch.testing.assert_close(weights, previous)


def test_clipping_the_update_norm_on_the_gramian() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    G = J @ J.T
    weights, _ = nash_mtl_weights(G)
    clipped = cap_update_norm(weights, G, max_norm=1.0)  # ‖Jᵀα‖ = √2 → scaled by 1/√2
    torch.testing.assert_close(clipped, weights / math.sqrt(2))
    assert cap_update_norm(weights, G, max_norm=10.0) is weights


def test_invalid_arguments() -> None:
    G = torch.eye(2)
    with pytest.raises(ValueError, match="max_iter must be a positive integer for Nash-MTL, got 0"):
        nash_mtl_weights(G, max_iter=0)
    with pytest.raises(ValueError, match="tol must be a finite number > 0 for Nash-MTL, got -1"):
        nash_mtl_weights(G, tol=-1)
    with pytest.raises(ValueError, match="previous must be a finite positive"):
        nash_mtl_weights(G, previous=torch.tensor([1.0, 0.0]))
