"""Input checks and conversions shared by the gradient methods (no math beyond casting).

Every method validates its Jacobian ``J`` (:func:`check_jacobian`) or Gramian ``G`` (:func:`prepare_gramian`,
which also returns the float64 CPU copy the solvers work on), its hyper-parameters and its generator here,
so that the messages are the same everywhere and name the method, the argument and what was received.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

F64 = torch.float64
CPU = torch.device("cpu")


def check_jacobian(J: Tensor, method: str = "this method") -> None:
    """Raise a ``ValueError`` unless ``J`` is a floating-point ``[T, P]`` tensor with ``T ≥ 1``."""
    if not isinstance(J, Tensor):
        raise TypeError(f"J must be a torch.Tensor for {method}, got {type(J).__name__}.")
    if J.ndim != 2 or J.shape[0] < 1:
        raise ValueError(f"J must be a [T, P] tensor with T >= 1 for {method}, got shape {tuple(J.shape)}.")
    if not J.is_floating_point():
        raise ValueError(f"J must be floating point for {method}, got dtype {J.dtype}.")


def check_square(G: Tensor, method: str, *, grouped: bool = False) -> None:
    """Raise unless ``G`` is a floating-point ``[T, T]`` (or, with ``grouped``, ``[K, T, T]``) tensor."""
    if not isinstance(G, Tensor):
        raise TypeError(f"G must be a torch.Tensor for {method}, got {type(G).__name__}.")
    ndims = (2, 3) if grouped else (2,)
    if G.ndim not in ndims or G.shape[-1] != G.shape[-2] or G.shape[-1] < 1:
        expected = "[T, T] or [K, T, T]" if grouped else "[T, T]"
        raise ValueError(
            f"G must be a square {expected} Gramian with T >= 1 for {method}, got shape {tuple(G.shape)}."
        )
    if not G.is_floating_point():
        raise ValueError(f"G must be floating point for {method}, got dtype {G.dtype}.")


def prepare_gramian(G: Tensor, method: str, *, grouped: bool = False) -> Tensor:
    """Validate a Gramian and return a detached, symmetrised float64 copy on the CPU.

    Accepts ``[T, T]`` (and, with ``grouped=True``, ``[K, T, T]``: one Gramian per parameter group).
    Non-finite entries raise a ``ValueError`` naming ``method``.
    """
    check_square(G, method, grouped=grouped)
    G64 = G.detach().to(device=CPU, dtype=F64)
    if not bool(torch.isfinite(G64).all()):
        raise ValueError(
            f"G must be finite for {method}, got non-finite entries (overflow or NaN gradients? form it with "
            "lightning_mtl.functional.gramian, which accumulates in float64)."
        )
    return (G64 + G64.transpose(-1, -2)) / 2


def as_output(weights64: Tensor, like: Tensor) -> Tensor:
    """Cast solver output back to the caller's dtype and device."""
    return weights64.to(device=like.device, dtype=like.dtype)


def input_eps(G: Tensor, eps: float | None, method: str) -> float:
    """Relative precision of the gradients behind ``G``: ``eps`` if given, else the epsilon of ``G``'s dtype.

    A float64 Gramian of float32 gradients (what :func:`~._gramian.gramian` returns) is only as precise as the
    gradients: its callers pass ``eps = torch.finfo(J.dtype).eps``.
    """
    if eps is None:
        return torch.finfo(G.dtype).eps
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 < eps < 1):
        raise ValueError(
            f"eps must be a number in (0, 1) for {method} (e.g. torch.finfo(J.dtype).eps), got {eps!r}."
        )
    return float(eps)


def check_generator(generator: torch.Generator | None, method: str) -> None:
    """Random draws happen on the CPU, so that a seeded generator gives the same draw on every process."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator for {method} (draws are made on the CPU so that they "
            f"match across devices), got one on {generator.device}."
        )


def randperms(n: int, count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` independent permutations of ``range(n)``, drawn in order from ``generator`` (CPU)."""
    if count == 0:
        return torch.zeros(0, n, dtype=torch.long)
    return torch.stack([torch.randperm(n, generator=generator) for _ in range(count)])


def preference_vector(
    preference: Tensor | Sequence[float] | None, T: int, method: str, default: float
) -> Tensor:
    """Validated float64 preference vector ``[T]`` (``default`` everywhere when ``None``)."""
    if preference is None:
        return torch.full((T,), default, dtype=F64)
    p = torch.as_tensor(preference).detach().to(device=CPU, dtype=F64)
    if p.shape != (T,):
        raise ValueError(f"preference must have shape [{T}] for {method}, got shape {tuple(p.shape)}.")
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"preference must be finite for {method}, got {p.tolist()}.")
    return p


def check_positive_int(value: int, name: str, method: str) -> None:
    """Raise unless ``value`` is an ``int`` ``≥ 1`` (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer for {method}, got {value!r}.")


def check_positive_float(value: float, name: str, method: str) -> None:
    """Raise unless ``value`` is a finite number ``> 0``."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0 for {method}, got {value!r}.")
