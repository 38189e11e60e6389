"""GradVac on hand-computed cases, and against a direct vector implementation with parameter groups."""

import math

import pytest
import torch

from lightning_mtl.functional.gradient_methods import gradvac, gradvac_weights, pcgrad


def test_zero_targets_reduce_to_pcgrad_and_update_the_ema() -> None:
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # φ₁₂ = φ₂₁ = cos(g1, g2) = −1/√2 < φ̂ = 0. Correction for task 1:
    # ‖g1‖(φ̂√(1−φ²) − φ√(1−φ̂²))/(‖g2‖√(1−φ̂²)) = 1·(0 + 1/√2)/(√2·1) = ½ → g1 + ½g2 = (0.5, 0.5)
    # task 2: √2·(1/√2)/1 = 1 → g2 + g1 = (0, 1); sum (0.5, 1.5), exactly PCGrad's
    update, targets = gradvac(J, beta=0.01)
    torch.testing.assert_close(update, torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(update, pcgrad(J))
    # φ̂ ← (1 − β)·0 + β·φ with the cosine measured before the correction
    expected = torch.tensor([[0.0, -0.01 / math.sqrt(2)], [-0.01 / math.sqrt(2), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(targets, expected)


def test_positive_target_raises_the_cosine_to_the_target() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([[0.0, 0.6], [0.0, 0.0]], dtype=torch.float64)
    # task 1: φ = 0 < 0.6: 1·(0.6·1 − 0)/(1·√(1 − 0.36) = 0.8) = 0.75 → g1ᴾᶜ = (1, 0.75), cos(g1ᴾᶜ, g2) = 0.6
    # task 2: φ = 0 = φ̂₂₁ → unchanged. Update (1, 1.75); φ̂₁₂ ← 0.5·0.6 + 0.5·0 = 0.3
    weights, new_targets = gradvac_weights(J @ J.T, targets, beta=0.5)
    torch.testing.assert_close(weights, torch.tensor([1.0, 1.75], dtype=torch.float64))
    torch.testing.assert_close(new_targets, torch.tensor([[0.0, 0.3], [0.0, 0.0]], dtype=torch.float64))


def _reference(J: torch.Tensor, targets: torch.Tensor, groups: list[int], beta: float, seed: int):
    """Direct vector implementation in the shape of LibMTL's loop (one order per task, shared by groups)."""
    T = J.shape[0]
    generator = torch.Generator().manual_seed(seed)
    bounds = [0, *torch.tensor(groups).cumsum(0).tolist()]
    targets = targets.clone()
    projected = J.clone()
    for i in range(T):
        others = [j for j in range(T) if j != i]
        order = [others[k] for k in torch.randperm(T - 1, generator=generator).tolist()]
        for j in order:
            for k in range(len(groups)):
                lo, hi = bounds[k], bounds[k + 1]
                gi, gj = projected[i, lo:hi], J[j, lo:hi]
                phi = (gi @ gj / (gi.norm() * gj.norm())).clamp(-1, 1)
                hat = targets[k, i, j]
                if phi < hat:
                    w = gi.norm() * (hat * (1 - phi**2).sqrt() - phi * (1 - hat**2).sqrt())
                    projected[i, lo:hi] = gi + gj * w / (gj.norm() * (1 - hat**2).sqrt())
                targets[k, i, j] = (1 - beta) * hat + beta * phi
    return projected.sum(dim=0), targets


@pytest.mark.parametrize("seed", range(4))
def test_parameter_groups_match_a_direct_implementation(seed: int) -> None:
    generator = torch.Generator().manual_seed(100 + seed)
    J = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    groups = [2, 3, 4]
    targets = torch.rand(3, 4, 4, generator=generator, dtype=torch.float64) - 0.3
    update, new_targets = gradvac(
        J, targets, beta=0.3, groups=groups, generator=torch.Generator().manual_seed(seed)
    )
    expected_update, expected_targets = _reference(J, targets, groups, 0.3, seed)
    torch.testing.assert_close(update, expected_update)
    torch.testing.assert_close(new_targets, expected_targets)
    # one group equals the whole model
    whole = gradvac(J, targets[0], beta=0.3, generator=torch.Generator().manual_seed(seed))
    grouped = gradvac(J, targets[:1], beta=0.3, groups=[9], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(whole.update, grouped.update)
    torch.testing.assert_close(whole.targets, grouped.targets[0])


def test_a_target_of_one_stays_finite() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    update, _ = gradvac(J, torch.ones(2, 2, dtype=torch.float64))
    assert torch.isfinite(update).all()


def test_invalid_arguments() -> None:
    J = torch.eye(3)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\] for GradVac, got 1.5"):
        gradvac(J, beta=1.5)
    with pytest.raises(ValueError, match="targets must have the Gramian's shape"):
        gradvac(J, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"targets must be finite cosine similarities in \[-1, 1\]"):
        gradvac(J, torch.full((3, 3), 2.0))
    with pytest.raises(ValueError, match="groups must sum to P=3 for GradVac, got sizes summing to 4"):
        gradvac(J, groups=[2, 2])
    with pytest.raises(ValueError, match="groups must be a non-empty sequence of positive sizes"):
        gradvac(J, groups=[3, 0])
