"""MGDA on hand-computed cases."""

import pytest
import torch

from lightning_mtl.functional.gradient_methods import mgda, mgda_weights


def test_orthogonal_gradients_of_different_lengths() -> None:
    J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # min over γ of ‖γ·(2, 0) + (1−γ)·(0, 1)‖² = 4γ² + (1−γ)²: 8γ − 2(1−γ) = 0 → γ = 0.2
    # w = (0.2, 0.8), d = (0.4, 0.8); KKT: Gw = (0.8, 0.8) = wᵀGw = 0.16·4 + 0.64·1 = 0.8
    torch.testing.assert_close(mgda_weights(J @ J.T), torch.tensor([0.2, 0.8], dtype=torch.float64))
    torch.testing.assert_close(mgda(J), torch.tensor([0.4, 0.8], dtype=torch.float64))


def test_the_shorter_of_two_parallel_gradients_wins() -> None:
    J = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)  # hull = segment [(1, 0), (2, 0)]
    torch.testing.assert_close(mgda_weights(J @ J.T), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_opposite_gradients_cancel() -> None:
    J = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)  # ½g1 + ½g2 = 0
    torch.testing.assert_close(mgda_weights(J @ J.T), torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(mgda(J), torch.zeros(2, dtype=torch.float64), atol=1e-9, rtol=0)


def test_l2_normalization_weights_apply_to_the_raw_gradients() -> None:
    # Normalised gradients (1, 0) and (1, 0) are equal: the even split w = (½, ½) is picked, and the update
    # applies it to the *unnormalised* gradients (official code): ½(1, 0) + ½(2, 0) = (1.5, 0).
    J = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(mgda(J, normalization="l2"), torch.tensor([1.5, 0.0], dtype=torch.float64))


def test_loss_normalization() -> None:
    # g/L: (2, 0)/2 = (1, 0) and (0, 3)/1 = (0, 3) → min over γ of γ² + 9(1−γ)²: γ = 0.9 → w = (0.9, 0.1)
    J = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    losses = torch.tensor([2.0, 1.0])
    w = mgda_weights(J @ J.T, normalization="loss", losses=losses)
    torch.testing.assert_close(w, torch.tensor([0.9, 0.1], dtype=torch.float64))
    # loss+: g/(L‖g‖) = (2, 0)/(2·2) = (½, 0) and (0, 3)/(1·3) = (0, 1) → min γ²/4 + (1−γ)²:
    # γ/2 = 2(1−γ) → γ = 0.8 → w = (0.8, 0.2)
    w = mgda_weights(J @ J.T, normalization="loss+", losses=losses)
    torch.testing.assert_close(w, torch.tensor([0.8, 0.2], dtype=torch.float64))


def test_loss_normalization_needs_losses() -> None:
    G = torch.eye(2)
    with pytest.raises(ValueError, match="losses are required"):
        mgda_weights(G, normalization="loss")
    with pytest.raises(ValueError, match="non-negative"):
        mgda_weights(G, normalization="loss", losses=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="normalization must be one of"):
        mgda_weights(G, normalization="norm")  # type: ignore[arg-type]
