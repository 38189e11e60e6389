"""PCGrad on hand-computed cases."""

import torch

from lightning_mtl.functional.gradient_methods import pcgrad, pcgrad_weights


def test_two_conflicting_gradients() -> None:
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # g1·g2 = −1 < 0.  g1ᴾᶜ = g1 − (g1·g2/‖g2‖²)·g2 = (1, 0) + ½·(−1, 1) = (0.5, 0.5)
    #                  g2ᴾᶜ = g2 − (g1·g2/‖g1‖²)·g1 = (−1, 1) + 1·(1, 0) = (0, 1)
    # sum = (0.5, 1.5) = 2·g1 + 1.5·g2  →  weights (2, 1.5)
    torch.testing.assert_close(pcgrad(J), torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(pcgrad_weights(J @ J.T), torch.tensor([2.0, 1.5], dtype=torch.float64))


def test_non_conflicting_gradients_are_summed() -> None:
    J = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # g1·g2 = 1 ≥ 0: nothing to project
    torch.testing.assert_close(pcgrad(J), torch.tensor([2.0, 1.0], dtype=torch.float64))


def test_projection_uses_the_original_gradients_in_the_drawn_order() -> None:
    # Three tasks: g1 = (1, 0), g2 = (−1, 1), g3 = (−1, −1). For task 1 the order matters:
    # order (2, 3): g1 → g1 + ½g2 = (0.5, 0.5); ·g3 = −1 < 0 → + ½g3 → (0, 0)
    # order (3, 2): g1 → g1 + ½g3 = (0.5, −0.5); ·g2 = −1 < 0 → + ½g2 → (0, 0)
    # Both orders give 0 for task 1 here; tasks 2 and 3 are checked against a direct vector loop.
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        orders = [torch.randperm(3, generator=generator).tolist() for _ in range(3)]
        expected = torch.zeros(2, dtype=torch.float64)
        for i in range(3):
            g = J[i].clone()
            for j in orders[i]:
                if j != i and g @ J[j] < 0:
                    g = g - (g @ J[j]) / (J[j] @ J[j]) * J[j]
            expected += g
        torch.testing.assert_close(pcgrad(J, generator=torch.Generator().manual_seed(seed)), expected)
