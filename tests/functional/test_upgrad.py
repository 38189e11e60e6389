"""UPGrad and DualProj on hand-computed cases."""

import pytest
import torch

from lightning_mtl.functional.gradient_methods import dualproj, dualproj_weights, upgrad, upgrad_weights

EXACT = 1e-12  # a negligible ridge, so that the hand-computed projections hold to 1e-9


def test_non_conflicting_gradients_are_averaged() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # the dual cone contains both
    torch.testing.assert_close(upgrad(J), torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(dualproj(J), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_upgrad_projects_each_gradient_on_the_dual_cone() -> None:
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # dual cone {v: v₁ ≥ 0, −v₁ + v₂ ≥ 0}.
    # g1/2 = (0.5, 0) violates the second face: its projection on the line v₂ = v₁ is (0.25, 0.25)
    # g2/2 = (−0.5, 0.5) violates v₁ ≥ 0: its projection on v₁ = 0 is (0, 0.5)
    # sum (0.25, 0.75) = a·g1 + b·g2 with b = 0.75, a − b = 0.25 → weights (1, 0.75)
    weights = upgrad_weights(J @ J.T, reg_eps=EXACT)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.75], dtype=torch.float64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        J.T @ weights, torch.tensor([0.25, 0.75], dtype=torch.float64), rtol=1e-9, atol=1e-9
    )


def test_dualproj_projects_the_mean() -> None:
    J = torch.tensor([[1.0, 0.0], [-3.0, 1.0]], dtype=torch.float64)
    # mean (−1, 0.5) violates g1·v ≥ 0; cone {v₁ ≥ 0, −3v₁ + v₂ ≥ 0}: projection on the face v₁ = 0 is
    # (0, 0.5), which satisfies −3·0 + 0.5 ≥ 0. (0, 0.5) = a·g1 + b·g2: b = 0.5, a = 1.5
    weights = dualproj_weights(J @ J.T, reg_eps=EXACT)
    torch.testing.assert_close(weights, torch.tensor([1.5, 0.5], dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_preference_vector() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        upgrad(J, preference=[1.0, 3.0]), torch.tensor([1.0, 3.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match=r"preference must have shape \[2\] for UPGrad"):
        upgrad(J, preference=[1.0, 2.0, 3.0])


def test_reg_eps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="reg_eps must be a finite number > 0 for DualProj, got 0"):
        dualproj(torch.eye(2), reg_eps=0)
