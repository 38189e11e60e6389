"""The Jacobian of the task losses: one batched backward (``vmap`` over the ``T`` rows), or a loop of ``T``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

#: ``"lean"`` is :class:`~lightning_mtl.gradients.TaskGradients`' Gramian-only engine (:mod:`~lightning_mtl.gradients.lean`)
JacobianMethod = Literal["auto", "batched", "loop", "lean"]


def _batched_grad(
    outputs: Tensor, inputs: Sequence[Tensor], scale: float, batched: bool
) -> list[Tensor | None]:
    T = outputs.shape[0]
    if batched:
        eye = torch.eye(T, device=outputs.device, dtype=outputs.dtype) * scale
        return list(
            torch.autograd.grad(
                outputs, inputs, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        )
    rows: list[list[Tensor | None]] = []
    for i in range(T):
        g = torch.zeros_like(outputs)
        g[i] = scale
        rows.append(
            list(torch.autograd.grad(outputs, inputs, grad_outputs=g, retain_graph=True, allow_unused=True))
        )
    out: list[Tensor | None] = []
    for j in range(len(inputs)):
        col = [r[j] for r in rows]
        if all(c is None for c in col):
            out.append(None)
        else:
            out.append(torch.stack([torch.zeros_like(inputs[j]) if c is None else c for c in col]))
    return out


def jacobian(
    outputs: Tensor, inputs: Sequence[Tensor], *, batched: bool = True, scale: float | None = None
) -> Tensor:
    """Jacobian ``[T, P]`` (float32 or wider) of ``outputs [T]`` w.r.t. ``inputs``, flattened and concatenated.

    One batched backward (``is_grads_batched=True``) when ``batched``, else ``T`` backward passes. The graph
    is retained (the caller back-propagates the combined loss afterwards). Inputs no output reaches get zero
    columns. ``scale`` (the AMP loss scale) multiplies the backward's seed and divides the result. No DDP
    hook fires (``torch.autograd.grad``): nothing is all-reduced behind the caller's back.
    """
    if outputs.ndim != 1:
        raise ValueError(f"jacobian expects a 1-d tensor of T losses, got shape {tuple(outputs.shape)}.")
    s = 1.0 if scale is None else float(scale)
    grads = _batched_grad(outputs, inputs, s, batched)
    T = outputs.shape[0]
    dtype = torch.promote_types(outputs.dtype, torch.float32)
    cols = []
    for g, x in zip(grads, inputs):
        if g is None:
            cols.append(torch.zeros(T, x.numel(), device=outputs.device, dtype=dtype))
        else:
            cols.append(g.reshape(T, -1).to(dtype))
    J = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
    return J / s if s != 1.0 else J


class JacobianEngine:
    """Computes Jacobians by one batched backward, and falls back to a per-task loop for good (with one
    warning) the first time the batched pass fails (an operation without a ``vmap`` batching rule).

    Args:
        method: ``"auto"`` (batched, loop fallback), ``"batched"`` (never fall back) or ``"loop"``.
        owner: name used in the warning.
    """

    def __init__(self, method: JacobianMethod = "auto", owner: str = "strategy") -> None:
        if method == "lean":
            raise ValueError(
                f"{owner} jacobian='lean' never forms the Jacobian (only its Gramian, for the methods that need "
                "nothing else): use 'auto', 'batched' or 'loop' where the Jacobian itself is needed."
            )
        if method not in ("auto", "batched", "loop"):
            raise ValueError(f"{owner} jacobian must be 'auto', 'batched' or 'loop', got {method!r}.")
        self.method = method
        self.owner = owner
        self.batched = method != "loop"

    def __call__(self, outputs: Tensor, inputs: Sequence[Tensor], scale: float | None = None) -> Tensor:
        if self.batched:
            try:
                return jacobian(outputs, inputs, batched=True, scale=scale)
            except RuntimeError as err:
                if self.method == "batched":
                    raise
                warnings.warn(
                    f"{self.owner}: the batched (vmap) backward failed ({str(err).splitlines()[0][:200]}); "
                    "computing per-task gradients with one backward pass per task from now on (slower). "
                    "Pass jacobian='loop' to silence this.",
                    stacklevel=3,
                )
                self.batched = False
        return jacobian(outputs, inputs, batched=False, scale=scale)


def unflatten(vector: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat ``[P]`` vector into views shaped like ``params``."""
    total = sum(p.numel() for p in params)
    if vector.numel() != total:
        raise ValueError(f"vector has {vector.numel()} elements, the parameters {total}.")
    out, offset = [], 0
    for p in params:
        out.append(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out
