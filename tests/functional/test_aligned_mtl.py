"""Aligned-MTL on hand-computed cases."""

import math

import pytest
import torch

from lightning_mtl.functional.gradient_methods import aligned_mtl, aligned_mtl_weights


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
