"""Properties shared by the gradient methods, checked on random and degenerate Jacobians (hypothesis)."""

from __future__ import annotations

import warnings

import pytest
import torch
from gradient_method_cases import DETERMINISTIC, METHODS, WEIGHTED, Method
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from lightning_mtl.functional import gradient_methods as gm

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STRUCTURES = ("random", "zero_row", "all_zero", "duplicate", "opposite", "rank_one", "parallel")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # FairGrad warns when no solution exists


def make_jacobian(T: int, P: int, structure: str, seed: int, scale: float, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=g, dtype=torch.float64)
    if structure == "zero_row":
        J[0] = 0
    elif structure == "all_zero":
        J.zero_()
    elif structure == "duplicate" and T > 1:
        J[-1] = J[0]
    elif structure == "opposite" and T > 1:
        J[-1] = -J[0]
    elif structure == "rank_one":
        J = torch.randn(T, 1, generator=g, dtype=torch.float64) @ torch.randn(
            1, P, generator=g, dtype=torch.float64
        )
    elif structure == "parallel":  # same direction, different positive lengths
        J = torch.rand(T, 1, generator=g, dtype=torch.float64).add(0.1) @ J[:1]
    return (J * scale).to(dtype)


@st.composite
def jacobians(
    draw: st.DrawFn,
    structures: tuple[str, ...] = STRUCTURES,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
    min_T: int = 1,
    max_T: int = 6,
    scales: tuple[int, int] = (-8, 8),
) -> Tensor:
    T = draw(st.integers(min_T, max_T))
    P = draw(st.integers(1, 8))
    structure = draw(st.sampled_from(structures))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = 10.0 ** draw(st.integers(*scales))
    dtype = draw(st.sampled_from(dtypes))
    return make_jacobian(T, P, structure, seed, scale, dtype)


def _ids(methods: list[Method]) -> list[str]:
    return [m.name for m in methods]


@pytest.mark.parametrize("method", METHODS, ids=_ids(METHODS))
@SETTINGS
@given(J=jacobians())
def test_finite_output_of_the_right_shape(method: Method, J: Tensor) -> None:
    update = method.update(J)
    assert update.shape == (J.shape[1],)
    assert update.dtype == J.dtype
    assert torch.isfinite(update).all()
    if method.weights is not None:
        weights = method.weights_of(J)
        assert weights.shape == (J.shape[0],)
        assert torch.isfinite(weights).all()


@pytest.mark.parametrize("method", WEIGHTED, ids=_ids(WEIGHTED))
@SETTINGS
@given(J=jacobians())
def test_update_is_the_combination_given_by_the_weights(method: Method, J: Tensor) -> None:
    expected = J.T @ method.weights_of(J).to(J.dtype)
    torch.testing.assert_close(method.update(J), expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("method", DETERMINISTIC, ids=_ids(DETERMINISTIC))
@SETTINGS
@given(
    J=jacobians(structures=("random", "duplicate", "parallel"), dtypes=(torch.float64,), min_T=2),
    data=st.data(),
)
def test_permutation_equivariance(method: Method, J: Tensor, data: st.DataObject) -> None:
    perm = torch.tensor(data.draw(st.permutations(range(J.shape[0]))))
    G = J @ J.T
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights, permuted = method.weights(G), method.weights(G[perm][:, perm])
    # FairGrad's equation has no solution when 0 is in the gradients' cone (it warns and returns
    # the solver's last iterate, which depends on the order): equivariance is only defined otherwise
    assume(not any("no solution" in str(w.message) for w in caught))
    update, permuted_update = J.T @ weights, J[perm].T @ permuted
    size = weights.abs() @ J.norm(dim=1)  # magnitude of the terms of Jᵀw, whatever their cancellation
    assert (permuted_update - update).norm() <= 1e-6 * size
    if method.name not in ("nash_mtl", "fairgrad", "fairgrad_alpha2", "cagrad"):
        # Loose: where the weights are not unique (0 in the hull), MGDA picks them with conditioning 1e10.
        torch.testing.assert_close(permuted, weights[perm], rtol=1e-5, atol=1e-5 * weights.abs().max().item())


@pytest.mark.parametrize("method", [m for m in METHODS if m.degree is not None], ids=lambda m: m.name)
@SETTINGS
@given(
    J=jacobians(structures=("random", "duplicate", "parallel"), dtypes=(torch.float64,), scales=(-3, 3)),
    factor=st.sampled_from([1e-3, 0.5, 3.0, 1e3]),
)
def test_positive_homogeneity(method: Method, J: Tensor, factor: float) -> None:
    """``update(cJ) = c^k update(J)``: k = 1 for most methods, 0 for Nash-MTL, (1−α)/(1+α) for FairGrad."""
    expected = factor**method.degree * method.update(J)
    weights = (
        method.weights(gm.gramian(J)) if method.weights is not None else torch.ones(J.shape[0], dtype=J.dtype)
    )
    size = factor**method.degree * (
        weights.abs() @ J.norm(dim=1)
    )  # the terms' size, whatever their cancellation
    assert (method.update(factor * J) - expected).norm() <= 1e-6 * size


def _conflict_tolerance(G: Tensor, weights: Tensor, dtype: torch.dtype, ridge: float) -> Tensor:
    """Rounding of the weights plus the ridge the method adds to ``G / tr G``."""
    rounding = 1e-6 if dtype == torch.float32 else 1e-12
    return rounding * (G.abs() @ weights.abs()) + ridge * G.trace() * weights.abs() + 1e-300


_RIDGES = {"mgda": 1e-10, "upgrad": 1e-4, "dualproj": 1e-4}


@pytest.mark.parametrize("name", sorted(_RIDGES))
@SETTINGS
@given(J=jacobians())
def test_update_does_not_conflict_with_any_task(name: str, J: Tensor) -> None:
    method = next(m for m in METHODS if m.name == name)
    G = J @ J.T
    weights = method.weights(G).double()
    G = G.double()
    assert (G @ weights >= -_conflict_tolerance(G, weights, J.dtype, _RIDGES[name])).all()


@SETTINGS
@given(J=jacobians(dtypes=(torch.float64,)))
def test_nash_mtl_update_does_not_conflict_when_solved(J: Tensor) -> None:
    weights, converged = gm.nash_mtl_weights(gm.gramian(J), tol=1e-8)
    if converged:
        assert (weights > 0).all()
        assert (J @ (J.T @ weights) > 0).all()  # gᵢ·d = 1/αᵢ at the bargaining solution


@SETTINGS
@given(J=jacobians(min_T=2, max_T=2))
def test_pcgrad_removes_the_conflict_of_two_tasks(J: Tensor) -> None:
    g1, g2 = J.double()
    d = gm.pcgrad(J).double()
    # Closed form for T = 2: each gradient loses its component along the other when they conflict.
    dot = g1 @ g2
    expected = g1 + g2
    if dot < 0:
        expected = expected - dot * (g1 / (g1 @ g1) + g2 / (g2 @ g2))
    scale = (J.double().norm() ** 2).item()
    rounding = 1e-5 if J.dtype == torch.float32 else 1e-10
    torch.testing.assert_close(d, expected, rtol=rounding * 10, atol=rounding * J.double().norm().item())
    assert g1 @ d >= -rounding * scale
    assert g2 @ d >= -rounding * scale


@SETTINGS
@given(J=jacobians())
def test_mgda_weights_are_the_min_norm_point_of_the_simplex(J: Tensor) -> None:
    G = J @ J.T
    w = gm.mgda_weights(G).double()
    G = G.double()
    assert (w >= 0).all()
    assert abs(w.sum().item() - 1.0) < (1e-6 if J.dtype == torch.float32 else 1e-12)
    # KKT on the simplex: (Gw)ᵢ ≥ wᵀGw for every i, with equality where wᵢ > 0.
    tol = (1e-6 if J.dtype == torch.float32 else 1e-9) * G.trace().item() + 1e-300
    Gw, value = G @ w, w @ G @ w
    assert (Gw >= value - tol).all()
    support = w > 1e-6
    assert (Gw[support] <= value + tol).all()


@SETTINGS
@given(J=jacobians())
def test_imtl_g_weights_sum_to_one(J: Tensor) -> None:
    w = gm.imtl_g_weights(gm.gramian(J))
    assert torch.isfinite(w).all()
    if (w != 0).any():
        assert abs(w.sum().item() - 1.0) < 1e-5


@pytest.mark.parametrize("method", [m for m in METHODS if m.random], ids=lambda m: m.name)
@SETTINGS
@given(J=jacobians(structures=("random",)))
def test_random_methods_depend_only_on_the_generator(method: Method, J: Tensor) -> None:
    torch.manual_seed(1)
    first = method.update(J)
    torch.manual_seed(2)  # the global generator must not matter once a generator is given
    torch.testing.assert_close(method.update(J), first, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS, ids=_ids(METHODS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(method: Method, bad: float) -> None:
    J = torch.randn(3, 4)
    J[1, 2] = bad
    with pytest.raises(ValueError, match="finite"):
        method.update(J)


@pytest.mark.parametrize("method", METHODS, ids=_ids(METHODS))
def test_single_task_gets_its_own_direction(method: Method) -> None:
    g = torch.tensor([[3.0, -4.0]], dtype=torch.float64)
    update = method.update(g)
    assert torch.isfinite(update).all()
    cosine = update @ g[0] / (update.norm() * g[0].norm())
    assert cosine.item() == pytest.approx(1.0)


@pytest.mark.parametrize("method", METHODS, ids=_ids(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_zero_jacobian_gives_a_zero_update(method: Method, dtype: torch.dtype) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        update = method.update(torch.zeros(3, 5, dtype=dtype))
    assert torch.equal(update, torch.zeros(5, dtype=dtype))
