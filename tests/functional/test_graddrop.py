"""GradDrop on hand-computed cases."""

import pytest
import torch

from lightning_mtl.functional.gradient_methods import graddrop

A = torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # batch of 1, two features
GRADS = torch.tensor([[[1.0, 2.0]], [[-3.0, 1.0]]], dtype=torch.float64)  # [T=2, B=1, 2]
# S = sign(A)⊙∇: S₁ = (1, −2), S₂ = (−3, −1); P = ½(1 + ΣS/Σ|S|) = ½(1 + (−2, −3)/(4, 3)) = (0.25, 0)
# feature 1: P = 0 < U always → keep the negative S: both tasks → 2 + 1 = 3
# feature 0: P = 0.25; seed 0 draws U₀ = 0.970 > P → keep S < 0: task 2 → −3
#                      seed 1 draws U₀ = 0.061 < P → keep S > 0: task 1 → 1


def _u(seed: int) -> torch.Tensor:
    return torch.rand(2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sign_purity_masks() -> None:
    assert _u(0)[0] > 0.25 and _u(1)[0] < 0.25
    out0 = graddrop(GRADS, A, generator=torch.Generator().manual_seed(0))
    out1 = graddrop(GRADS, A, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out0, torch.tensor([[-3.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(out1, torch.tensor([[1.0, 3.0]], dtype=torch.float64))


def test_leak() -> None:
    # leak (1, 0), seed 0: task 1 always passes (1 and 2), task 2 is masked as before (−3 and 1)
    out = graddrop(GRADS, A, leak=torch.tensor([1.0, 0.0]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.tensor([[1.0 - 3.0, 2.0 + 1.0]], dtype=torch.float64))
    torch.testing.assert_close(graddrop(GRADS, A, leak=1.0), GRADS.sum(dim=0))


def test_signs_are_summed_over_the_batch() -> None:
    A = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)  # batch of 2, one feature
    grads = torch.tensor([[[2.0], [1.0]], [[-1.0], [3.0]]], dtype=torch.float64)
    # S₁ = 2·1 + 1·(−1) = 1, S₂ = −1·1 + 3·(−1) = −4; P = ½(1 − 3/5) = 0.2, one draw for the feature
    # seed 0: U = 0.970 > P → task 2 kept for the whole batch; seed 1: U = 0.061 < P → task 1
    torch.testing.assert_close(graddrop(grads, A, generator=torch.Generator().manual_seed(0)), grads[1])
    torch.testing.assert_close(graddrop(grads, A, generator=torch.Generator().manual_seed(1)), grads[0])


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match=r"grads must be \[T, \*A\]"):
        graddrop(torch.zeros(2, 3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"leak must be a float or a \[2\] tensor with values in \[0, 1\]"):
        graddrop(GRADS, A, leak=torch.tensor([0.5, 2.0]))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU torch.Generator"):
            graddrop(GRADS, A, generator=torch.Generator(device="cuda"))
