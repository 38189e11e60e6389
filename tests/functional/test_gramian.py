"""Shared helpers: the float64 Gramian, the cosine helpers, input validation and the bounded QP solver."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_mtl.functional import _gramian, cosine_min, cosine_similarities, gramian
from lightning_mtl.functional._linalg import psd_part
from lightning_mtl.functional._qp import solve_bounded_qp
from lightning_mtl.functional.gradient_methods import mgda, mgda_weights, pcgrad


def _brute_force(Q: torch.Tensor, q: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Enumerate the free sets; keep the KKT point (unique for Q positive definite)."""
    T = Q.shape[0]
    for mask in itertools.product([False, True], repeat=T):
        free = torch.tensor(mask)
        x = lower.clone()
        if free.any():
            F = free.nonzero().squeeze(1)
            A = (~free).nonzero().squeeze(1)
            rhs = -q[F] - Q[F][:, A] @ lower[A]
            x[F] = torch.linalg.solve(Q[F][:, F], rhs)
        gradient = Q @ x + q
        if (x[free] >= lower[free] - 1e-10).all() and (gradient[~free] >= -1e-10).all():
            return x
    raise AssertionError("no KKT point")


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 6), B=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_bounded_qp_matches_brute_force(T: int, B: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(T, T + 1, generator=g, dtype=torch.float64)
    Q = M @ M.T / T + 1e-3 * torch.eye(T, dtype=torch.float64)
    q = torch.randn(B, T, generator=g, dtype=torch.float64)
    lower = torch.randn(B, T, generator=g, dtype=torch.float64).clamp_min(0) * torch.rand(B, 1, generator=g)
    x, _ = solve_bounded_qp(Q, q, lower)
    for b in range(B):
        torch.testing.assert_close(x[b], _brute_force(Q, q[b], lower[b]), rtol=1e-7, atol=1e-9)


def test_psd_part_removes_only_negative_eigenvalues() -> None:
    G = torch.tensor([[1.0, 0.0], [0.0, -1e-9]], dtype=torch.float64)
    torch.testing.assert_close(psd_part(G), torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    G = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    assert psd_part(G) is G


def test_shapes_and_types_are_checked() -> None:
    with pytest.raises(
        ValueError, match=r"J must be a \[T, P\] tensor with T >= 1 for MGDA, got shape \(3,\)"
    ):
        mgda(torch.ones(3))
    with pytest.raises(
        ValueError, match=r"J must be a \[T, P\] \(or \[T, ...\]\) tensor with T >= 1 for gramian"
    ):
        gramian(torch.ones(0, 3))
    with pytest.raises(ValueError, match="J must be floating point for gramian"):
        gramian(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(
        ValueError, match=r"G must be a square \[T, T\] Gramian with T >= 1 for cosine_similarities"
    ):
        cosine_similarities(torch.ones(2, 3))
    with pytest.raises(ValueError, match="J must be floating point for PCGrad"):
        pcgrad(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"G must be a square \[T, T\] Gramian with T >= 1 for MGDA"):
        mgda_weights(torch.ones(2, 3))
    with pytest.raises(ValueError, match="G must be finite for MGDA"):
        mgda_weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))


def test_weights_keep_the_gramian_dtype_and_device() -> None:
    G = torch.eye(3, dtype=torch.float32)
    w = mgda_weights(G)
    assert w.dtype == torch.float32 and w.device == G.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_inputs_and_cpu_generators() -> None:
    J = torch.randn(4, 10, device="cuda")
    G = gramian(J.half())
    assert G.device == J.device and G.dtype == torch.float64
    torch.testing.assert_close(G.cpu(), gramian(J.half().cpu()))
    update = pcgrad(J, generator=torch.Generator().manual_seed(0))
    assert update.device == J.device
    torch.testing.assert_close(update.cpu(), pcgrad(J.cpu(), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        pcgrad(J, generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_gramian_is_float64_and_accurate_for_every_dtype(dtype: torch.dtype) -> None:
    J = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)).to(dtype)  # [T, ...] is flattened
    G = gramian(J)
    assert G.dtype == torch.float64 and G.shape == (3, 3)
    assert torch.equal(G, G.T)
    flat = J.reshape(3, -1).double()
    # products accumulated in float32 (float64 for a float64 J)
    rtol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(G, flat @ flat.T, rtol=rtol, atol=rtol * float((flat @ flat.T).abs().max()))


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_gramian_of_a_float32_jacobian_neither_overflows_nor_underflows(scale: float) -> None:
    J = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 3.0]])
    assert not torch.isfinite((J * scale) @ (J * scale).T).all() or ((J * scale) @ (J * scale).T == 0).any()
    G = gramian(J * scale)
    expected = (J * scale).double() @ (J * scale).double().T
    torch.testing.assert_close(G, expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("scale", [1e-38, 1e-20, 1e20, 1e37])
def test_gramian_rescales_exactly_by_powers_of_two(scale: float) -> None:
    """Outside float32's safe range the Jacobian is rescaled by a power of two: exact, so the result is the
    float32 product of the unscaled entries times scale² (for a power-of-two scale, bit for bit)."""
    J = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    exact = J.double() @ J.double().T
    G = gramian(J * scale)
    assert torch.isfinite(G).all()
    torch.testing.assert_close(G / scale**2, exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    power = J * 2.0**100  # a power-of-two scale: the rescaled entries are J's own, bit for bit
    torch.testing.assert_close(gramian(power), gramian(J) * 2.0**200, rtol=0.0, atol=0.0)


def test_gramian_of_tasks_on_very_different_scales() -> None:
    """One task's gradient 1e-30 times the other's: its float32 self-products would underflow to 0."""
    J = torch.randn(2, 40, generator=torch.Generator().manual_seed(3))
    J[1] *= 1e-30
    G = gramian(J)
    exact = J.double() @ J.double().T
    assert G[1, 1] > 0
    torch.testing.assert_close(G / exact, torch.ones(2, 2, dtype=torch.float64), rtol=1e-5, atol=0.0)


def test_gramian_of_subnormal_entries_keeps_what_survived_the_scaling() -> None:
    J = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * 2.0**-140  # float32 subnormals
    G = gramian(J)
    assert torch.isfinite(G).all() and (G.diagonal() > 0).all()
    torch.testing.assert_close(G, J.double() @ J.double().T, rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("scale", [1.0, 1e30])
def test_gramian_converts_over_column_chunks(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    J = torch.randn(4, 103, generator=torch.Generator().manual_seed(1))
    half, scaled = J.half(), J * scale  # converted to float32 / rescaled chunk by chunk
    whole_half, whole_scaled = gramian(half), gramian(scaled)
    monkeypatch.setattr(_gramian, "_CHUNK_ELEMENTS", 4 * 10)  # 11 chunks of 10 columns (the last of 3)
    monkeypatch.setattr(_gramian, "_MIN_CHUNK_COLUMNS", 1)
    torch.testing.assert_close(gramian(half), whole_half, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gramian(scaled), whole_scaled, rtol=1e-6, atol=0.0)
    flat = half.double()
    torch.testing.assert_close(gramian(half), flat @ flat.T, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 1e-150, 1e150])
def test_cosine_similarities(scale: float) -> None:
    J = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [-2.0, 0.0]], dtype=torch.float64) * scale
    cos = cosine_similarities(gramian(J))
    r = 2**-0.5
    expected = torch.tensor(
        [[1.0, r, 0.0, -1.0], [r, 1.0, 0.0, -r], [0.0, 0.0, 1.0, 0.0], [-1.0, -r, 0.0, 1.0]],
        dtype=torch.float64,
    )
    assert cos.dtype == torch.float64
    torch.testing.assert_close(cos, expected, rtol=1e-12, atol=1e-12)
    assert cosine_min(gramian(J)).item() == pytest.approx(-1.0)
    assert cosine_min(gramian(J[:2])).item() == pytest.approx(r)


def test_cosine_min_of_one_task_is_one() -> None:
    assert cosine_min(torch.tensor([[4.0]])).item() == 1.0
    assert cosine_min(torch.zeros(1, 1)).item() == 1.0
    assert cosine_similarities(torch.tensor([[4.0]], dtype=torch.float32)).dtype == torch.float64


def _kkt_residual(Q: torch.Tensor, q: torch.Tensor, lower: torch.Tensor, x: torch.Tensor) -> float:
    """Largest violation of the KKT conditions of ``min ½xᵀQx + qᵀx, x ≥ lower`` over the rows."""
    gradient = x @ Q + q
    slack = x - lower
    return max(
        float((-slack).clamp_min(0).max()),  # feasibility
        float((-gradient).clamp_min(0).max()),  # multipliers ≥ 0
        float((gradient * slack).abs().max()),  # complementarity
    )


@pytest.mark.parametrize("force_lu", [False, True])
def test_bounded_qp_large_batches_match_row_by_row(monkeypatch: pytest.MonkeyPatch, force_lu: bool) -> None:
    """Batches larger than one linear-solve group (rows grouped by free-set size) give each row's own
    solution; so does the LU fallback taken when a Cholesky factorisation fails."""
    if force_lu:
        real = torch.linalg.cholesky_ex

        def failing(K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            factor, info = real(K)
            return factor, torch.ones_like(info)

        monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    g = torch.Generator().manual_seed(3)
    T, B = 24, 90
    M = torch.randn(T, T, generator=g, dtype=torch.float64)
    Q = M @ M.T / T + 1e-3 * torch.eye(T, dtype=torch.float64)
    q = (
        torch.randn(B, T, generator=g, dtype=torch.float64)
        * torch.linspace(0.1, 3.0, B, dtype=torch.float64)[:, None]
    )
    lower = torch.zeros(B, T, dtype=torch.float64)
    lower[torch.arange(B), torch.arange(B) % T] = torch.rand(B, generator=g, dtype=torch.float64)
    x, free = solve_bounded_qp(Q, q, lower)
    assert len(set(free.sum(dim=1).tolist())) > 3  # rows of several free-set sizes
    assert _kkt_residual(Q, q, lower, x) < 1e-10
    for b in range(0, B, 7):
        torch.testing.assert_close(
            x[b], solve_bounded_qp(Q, q[b : b + 1], lower[b : b + 1])[0][0], rtol=1e-9, atol=1e-12
        )
