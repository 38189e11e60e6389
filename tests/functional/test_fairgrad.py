"""FairGrad on hand-computed cases."""

import pytest
import torch

from lightning_mtl.functional.gradient_methods import fairgrad, fairgrad_weights, nash_mtl_weights


def test_orthogonal_gradients() -> None:
    G = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    # α = 1: wᵢ·Gᵢᵢ = 1/wᵢ → w = (1, ½), the Nash-MTL solution
    torch.testing.assert_close(fairgrad_weights(G), torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(fairgrad_weights(G), nash_mtl_weights(G).weights)
    # α = 2: w₁ = w₁^(−½) → 1; 4w₂ = w₂^(−½) → w₂^(3/2) = ¼ → w₂ = 4^(−2/3)
    torch.testing.assert_close(
        fairgrad_weights(G, alpha=2.0), torch.tensor([1.0, 4 ** (-2 / 3)], dtype=torch.float64)
    )
    # α = 0: linear scalarisation
    torch.testing.assert_close(fairgrad_weights(G, alpha=0.0), torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_solution_satisfies_the_fairness_equation_at_any_scale(alpha: float) -> None:
    J = torch.randn(4, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for scale in (1e-6, 1.0, 1e6):
        G = (scale * J) @ (scale * J).T
        w = fairgrad_weights(G, alpha=alpha)
        torch.testing.assert_close(w.pow(1 / alpha) * (G @ w), torch.ones(4, dtype=torch.float64))


def test_no_solution_warns_and_stays_finite() -> None:
    J = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        update = fairgrad(J, alpha=2.0)
    assert torch.isfinite(update).all()


@pytest.mark.parametrize("alpha", [-1.0, float("inf"), float("nan")])
def test_invalid_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0 for FairGrad"):
        fairgrad(torch.eye(2), alpha=alpha)
