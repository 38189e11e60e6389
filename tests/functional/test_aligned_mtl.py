"""Aligned-MTL on hand-computed cases."""

import math

import pytest
import torch

from lightning_mtl.functional.gradient_methods import aligned_mtl, aligned_mtl_weights, gramian


def test_orthogonal_gradients_get_equal_norms() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    # G = diag(1, 4): λ = (4, 1), V = I; B = √λ_min·diag(1/√1, 1/√4) = diag(1, ½)
    # α = B·1 = (1, ½); aligned gradients 1·g₁ = (1, 0), ½·g₂ = (0, 1) (norms √λ_min = 1); d = (1, 1)
    torch.testing.assert_close(aligned_mtl_weights(J @ J.T), torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(aligned_mtl(J), torch.tensor([1.0, 1.0], dtype=torch.float64))
    # "median" of (4, 1) is the lower median 1 (torch.median), as "min"; "rmse" uses the mean 2.5
    torch.testing.assert_close(aligned_mtl(J, scale_mode="median"), aligned_mtl(J))
    torch.testing.assert_close(
        aligned_mtl(J, scale_mode="rmse"), math.sqrt(2.5) * torch.tensor([1.0, 1.0], dtype=torch.float64)
    )
    # TorchJD's convention w = 1/T halves everything
    torch.testing.assert_close(
        aligned_mtl(J, preference=[0.5, 0.5]), torch.tensor([0.5, 0.5], dtype=torch.float64)
    )


def test_aligned_gradients_are_orthogonal_with_equal_norms() -> None:
    J = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    G = J @ J.T
    eigenvalues = torch.linalg.eigvalsh(G)
    # the aligned gradients are the rows of BJ (B symmetric); their Gramian B G B = λ_min·I
    B = torch.stack([aligned_mtl_weights(G, preference=e) for e in torch.eye(3, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(B @ G @ B, eigenvalues.min() * torch.eye(3, dtype=torch.float64))


def test_unknown_scale_mode() -> None:
    with pytest.raises(ValueError, match="scale_mode must be one of"):
        aligned_mtl(torch.eye(2), scale_mode="max")  # type: ignore[arg-type]


def test_float32_gradients_apart_by_rounding_are_collinear() -> None:
    """``aligned_mtl(J)`` drops eigenvalues below the precision of ``J`` (float32), not of its float64 Gramian."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=g, dtype=torch.float64)
    J = (torch.tensor([[1.0], [2.0], [0.5]], dtype=torch.float64) * base).float()
    J[1] += 1e-6 * torch.randn(1000, generator=g)  # apart only at the level of float32 rounding
    # one kept eigenvector v = n/‖n‖ (n the lengths) with σ = λ_max: B = vvᵀ, α = v(vᵀ1) = n·Σn/‖n‖²
    n = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    weights = aligned_mtl_weights(gramian(J), eps=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(weights, n * n.sum() / n.square().sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aligned_mtl(J), J.T @ weights.float())
    with pytest.raises(ValueError, match=r"eps must be a number in \(0, 1\) for Aligned-MTL"):
        aligned_mtl_weights(gramian(J), eps=float("nan"))
