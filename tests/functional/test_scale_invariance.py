"""Scale of the losses: what every gradient method does when every loss is multiplied by ``s = 1e±30``.

Multiplying every loss by ``s`` multiplies the Jacobian by ``s`` and the Gramian by ``s²``. For the methods
that are scale-invariant by their definition (MGDA, IMTL-G, PCGrad, GradVac, CAGrad, Aligned-MTL, UPGrad,
DualProj, GradDrop: ``degree = 1``) the weights must not change and the update must scale by ``s``; Nash-MTL
and FairGrad solve ``Gw = w^(−1/α)``, so their weights scale by ``s^(degree − 1)`` (``degree = 0`` for
Nash-MTL and FairGrad with ``α = 1``, ``(1 − α)/(1 + α)`` otherwise). In float32 the Gramian ``J Jᵀ``
overflows at ``s = 1e30`` and underflows at ``s = 1e-30``: :func:`gramian` must accumulate in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from gradient_method_cases import METHODS, WEIGHTED, Method
from torch import Tensor

from lightning_mtl.functional import _qp, gramian
from lightning_mtl.functional import gradient_methods as gm

SCALES = (1e-30, 1e30)
SHAPES = [(T, seed) for T in range(2, 7) for seed in range(3)]
P = 16


def _jacobian(T: int, seed: int) -> Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(100 * T + seed), dtype=torch.float64)


def _call(fn, *args):  # noqa: ANN001, ANN202 - FairGrad warns only where no solution exists
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("T", "seed"), SHAPES)
@pytest.mark.parametrize("method", WEIGHTED, ids=lambda m: m.name)
def test_weights_follow_the_scale_of_the_losses(
    method: Method, T: int, seed: int, scale: float, dtype: torch.dtype
) -> None:
    """``<name>_weights(gramian(sJ)) == s^(degree − 1)·<name>_weights(gramian(J))``: the same if invariant."""
    J = _jacobian(T, seed)
    expected = scale ** (method.degree - 1) * _call(method.weights, gramian(J.to(dtype)))
    scaled = _call(method.weights, gramian((J * scale).to(dtype)))
    assert torch.isfinite(scaled).all(), f"{method.name}: non-finite weights at loss scale {scale}"
    # float32: J and sJ are rounded independently (relative 6e-8), the weights move by about that much
    rtol = 1e-5 if dtype == torch.float32 else 1e-8
    size = expected.abs().max().item()
    torch.testing.assert_close(
        scaled, expected, rtol=rtol, atol=rtol * size, msg=lambda m: f"{method.name} at scale {scale}: {m}"
    )


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("T", "seed"), SHAPES[::3])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_float32_updates_scale_with_the_losses(method: Method, T: int, seed: int, scale: float) -> None:
    """``<name>(sJ) == s^degree·<name>(J)`` for a float32 ``J``, whose own ``J Jᵀ`` over- or underflows."""
    J = _jacobian(T, seed).float()
    expected = scale**method.degree * _call(method.update, J).double()
    scaled = _call(method.update, J * scale)
    assert scaled.dtype == torch.float32
    assert torch.isfinite(scaled).all(), f"{method.name}: non-finite update at loss scale {scale}"
    weights = method.weights(gramian(J)) if method.weights is not None else torch.ones(T, dtype=torch.float64)
    size = scale**method.degree * (weights.abs() @ J.double().norm(dim=1)).item()  # the terms' size
    assert (scaled.double() - expected).norm().item() <= 1e-5 * size, method.name


@pytest.mark.parametrize("scale", SCALES)
def test_the_reported_cases_at_tiny_and_huge_scales(scale: float) -> None:
    """Issue 7 item 4: a float32 Gramian gave MGDA [.5, .5] and IMTL-G [0, 0] at 1e-30, and raised at 1e30."""
    J = torch.tensor([[1.0, 0.0], [1.0, 3.0]])  # MGDA: not [.5, .5]; IMTL-G: not [0, 0]
    G = gramian(J * scale)
    torch.testing.assert_close(gm.mgda_weights(G), gm.mgda_weights(gramian(J)))
    torch.testing.assert_close(gm.imtl_g_weights(G), gm.imtl_g_weights(gramian(J)))
    assert not torch.allclose(gm.mgda_weights(G), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert gm.imtl_g_weights(G).abs().sum() > 0.5


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("T", "seed"), SHAPES[::2])
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_projection_weights_are_linear_in_the_preference(name: str, T: int, seed: int, scale: float) -> None:
    """The QP's tolerances are relative: a preference ``c·p`` gives ``c`` times the weights of ``p``."""
    weights = getattr(gm, f"{name}_weights")
    J = _jacobian(T, seed)
    G = gramian(J)
    p = torch.rand(T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    expected = scale * weights(G, preference=p)
    torch.testing.assert_close(
        weights(G, preference=p * scale), expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item()
    )


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("seed", range(20))
def test_bounded_qp_tolerances_are_relative(monkeypatch: pytest.MonkeyPatch, seed: int, scale: float) -> None:
    """The primal active-set phase alone (no initial guess) solves ``(Q, s·q, s·lower)`` as ``s·x``.

    Its blocking and optimality tolerances had an absolute ``1.0`` term: at ``s = 1e-30`` every multiplier
    looked optimal and the first iterate was returned.
    """
    monkeypatch.setattr(_qp, "_guess_free_set", lambda Q, q, lower, free, padded: free)
    g = torch.Generator().manual_seed(seed)
    T = 2 + seed % 9
    M = torch.randn(T, T + 1, generator=g, dtype=torch.float64)
    Q = M @ M.T / T + 1e-3 * torch.eye(T, dtype=torch.float64)
    q = torch.randn(1, T, generator=g, dtype=torch.float64)
    lower = torch.randn(1, T, generator=g, dtype=torch.float64)
    expected = scale * _qp.solve_bounded_qp(Q, q, lower)[0]
    x, _ = _qp.solve_bounded_qp(Q, q * scale, lower * scale)
    torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
