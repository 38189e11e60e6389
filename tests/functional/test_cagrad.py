"""CAGrad on hand-computed cases."""

import pytest
import torch

from lightning_mtl.functional.gradient_methods import cagrad, cagrad_weights


def test_symmetric_case() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # g0 = (½, ½); g_wᵀg0 = ½ for every w ∈ Δ, so w* minimises ‖g_w‖: w* = (½, ½), g_w = g0.
    # d = g0 + c‖g0‖·g0/‖g0‖ = (1 + c)·g0; update d/(1 + c²) = (1.4/1.16)·(½, ½) for c = 0.4
    expected = torch.full((2,), 0.5 * 1.4 / 1.16, dtype=torch.float64)
    torch.testing.assert_close(cagrad(J), expected)
    torch.testing.assert_close(cagrad_weights(J @ J.T), expected)
    torch.testing.assert_close(cagrad(J, rescale=0), torch.full((2,), 0.5 * 1.4, dtype=torch.float64))
    torch.testing.assert_close(cagrad(J, rescale=2), torch.full((2,), 0.5 * 1.4 / 1.4, dtype=torch.float64))


def test_parallel_gradients_pick_the_shorter_one() -> None:
    J = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    # g0 = (2, 0), φ = c‖g0‖ = 0.8; g_w = (3 − 2w₁, 0): the objective 2(3 − 2w₁) + 0.8(3 − 2w₁) is minimal
    # at w₁ = 1, g_w = (1, 0). d = g0 + 0.8·(1, 0) = (2.8, 0); update d/1.16 = (2.41379..., 0)
    # weights: (½ + 0.8·1, ½)/1.16 = (1.3, 0.5)/1.16
    torch.testing.assert_close(cagrad(J), torch.tensor([2.8 / 1.16, 0.0], dtype=torch.float64))
    torch.testing.assert_close(cagrad_weights(J @ J.T), torch.tensor([1.3, 0.5], dtype=torch.float64) / 1.16)


def test_c_zero_is_the_mean_gradient() -> None:
    J = torch.tensor([[1.0, 2.0], [-3.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(cagrad(J, c=0.0), J.mean(dim=0))


def test_zero_mean_gradient_gives_zero() -> None:
    J = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(cagrad(J), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(cagrad_weights(J @ J.T), torch.full((2,), 0.5 / 1.16, dtype=torch.float64))


@pytest.mark.parametrize("c", [-0.1, float("inf"), float("nan")])
def test_c_out_of_range(c: float) -> None:
    with pytest.raises(ValueError, match=rf"c must be a finite number >= 0 for CAGrad, got {c}"):
        cagrad(torch.eye(2), c=c)


@pytest.mark.parametrize(
    ("c", "rescale", "expected"), [(1.0, 1, 0.5), (1.5, 1, 0.5 * 2.5 / 3.25), (2.0, 0, 1.5)]
)
def test_c_at_least_one_is_allowed(c: float, rescale: int, expected: float) -> None:
    """The paper's theorem covers c >= 1 (Pareto-stationarity), the authors' code accepts it. Two orthogonal
    unit gradients: by symmetry w* = (½, ½), g_w* = g₀, ‖g₀‖ = 1/√2, so d = (1 + c)g₀ and the weights are
    ½(1 + c)/(1 + c²) (rescale=1) or ½(1 + c) (rescale=0)."""
    weights = cagrad_weights(torch.eye(2, dtype=torch.float64), c=c, rescale=rescale)
    torch.testing.assert_close(weights, torch.full((2,), expected, dtype=torch.float64))
