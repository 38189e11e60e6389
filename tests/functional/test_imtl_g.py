"""IMTL-G on hand-computed cases."""

import math

import pytest
import torch

from lightning_mtl.functional.gradient_methods import gramian, imtl_g, imtl_g_weights


def test_orthogonal_gradients() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    # G = diag(1, 4), √diag G = (1, 2), G⁻¹√diag G = (1, ½), normalised to sum 1: (2/3, 1/3)
    # d = (2/3, 2/3): d·u₁ = d·u₂ = 2/3
    torch.testing.assert_close(imtl_g_weights(J @ J.T), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(imtl_g(J), torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))


def test_equal_projections_on_unit_gradients() -> None:
    J = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    # G = [[1, 1], [1, 2]], G⁻¹ = [[2, −1], [−1, 1]], √diag G = (1, √2)
    # G⁻¹(1, √2) = (2 − √2, √2 − 1), sum 1 → α = (2 − √2, √2 − 1); d = (1, √2 − 1)
    # d·u₁ = 1 and d·u₂ = (1 + √2 − 1)/√2 = 1
    r2 = math.sqrt(2)
    torch.testing.assert_close(imtl_g_weights(J @ J.T), torch.tensor([2 - r2, r2 - 1], dtype=torch.float64))
    d = imtl_g(J)
    units = J / J.norm(dim=1, keepdim=True)
    torch.testing.assert_close(units @ d, torch.ones(2, dtype=torch.float64))


def test_a_zero_gradient_gets_no_weight() -> None:
    J = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # pinv(diag(4, 0)) = diag(¼, 0)
    torch.testing.assert_close(imtl_g_weights(J @ J.T), torch.tensor([1.0, 0.0], dtype=torch.float64))


def _rounding_collinear() -> torch.Tensor:
    """Three float32 gradients along one direction (lengths 1, 2, ½), apart only at the level of rounding."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=g, dtype=torch.float64)
    J = (torch.tensor([[1.0], [2.0], [0.5]], dtype=torch.float64) * base).float()
    J[1] += 1e-6 * torch.randn(1000, generator=g)
    return J


def test_float32_gradients_apart_by_rounding_are_collinear() -> None:
    """``imtl_g(J)`` cuts eigenvalues at the precision of ``J`` (float32), not of its float64 Gramian."""
    J = _rounding_collinear()
    # collinear gᵢ = nᵢu: pinv(nnᵀ)n ∝ n, so α = n/Σn
    expected = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) / 3.5
    weights = imtl_g_weights(gramian(J), eps=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(imtl_g(J), J.T @ weights.float())
    with pytest.raises(ValueError, match=r"eps must be a number in \(0, 1\) for IMTL-G"):
        imtl_g_weights(gramian(J), eps=0.0)
