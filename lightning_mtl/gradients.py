"""Per-task gradients: the Jacobian of the task losses, representation gradients, and their DDP reduction.

This layer knows torch and the Trainer's distributed strategy, and nothing of any multi-task method. The
strategies in :mod:`lightning_mtl.strategies` ask it for one of two things:

- the **Jacobian** ``J [T, P]`` of the ``T`` task losses w.r.t. the shared parameters (flattened and
  concatenated in the order of ``shared_parameters()``), computed by one batched backward pass
  (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over the ``T`` rows of the identity)
  and, where an operation of the graph has no batching rule, by a loop of ``T`` backward passes;
- the **representation gradients** ``[T, *z.shape]``: the gradients of the task losses w.r.t. the shared
  representation ``z`` the model marked with
  :meth:`~lightning_mtl.MultiTaskModule.shared_representation` (MGDA-UB's trick: its cost depends on the
  heads, not on the encoder).

Both go through ``torch.autograd.grad``, so no DDP hook fires and nothing is all-reduced behind the
caller's back: :func:`reduce_mean_` averages what a method needs once. Under 16-bit AMP the backward runs
on the losses multiplied by the GradScaler's scale (so that fp16 gradients do not underflow) and the result
is divided by it: callers always get unscaled gradients, possibly non-finite when the scaled pass
overflowed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = [
    "JacobianEngine",
    "add_to_grad",
    "flatten_grads",
    "grad_scale",
    "gramian",
    "jacobian",
    "marked_representation",
    "reduce_mean_",
    "representation_gradients",
    "shared_parameters_of",
    "unflatten",
]


# ---------------------------------------------------------------------------------------------- inputs
def shared_parameters_of(module: pl.LightningModule, owner: str) -> list[torch.nn.Parameter]:
    """The trainable shared parameters declared by ``module.shared_parameters()`` (deduplicated, in order).

    Raises a ``ValueError`` naming ``owner`` (the strategy) when the module declares none.
    """
    declared = module.shared_parameters() if hasattr(module, "shared_parameters") else None
    fix = (
        f"{owner} needs the shared parameters: override shared_parameters() in {type(module).__name__} "
        "to return them, e.g. `def shared_parameters(self): return self.encoder.parameters()`"
    )
    if declared is None:
        raise ValueError(f"{type(module).__name__}.shared_parameters() returned None. {fix}.")
    seen: set[int] = set()
    params = []
    for p in declared:
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"{type(module).__name__}.shared_parameters() must yield parameters, got {type(p).__name__}. {fix}."
            )
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise ValueError(
            f"{type(module).__name__}.shared_parameters() yielded no trainable parameter. {fix}."
        )
    return params


def marked_representation(module: pl.LightningModule, owner: str) -> Tensor:
    """The tensor marked by ``self.shared_representation(z)`` in this training step's ``task_losses``."""
    z = getattr(module, "_shared_representation", None)
    if z is None:
        raise RuntimeError(
            f"{owner}(mode='representation') needs the shared representation, but {type(module).__name__}."
            "task_losses did not mark one in this training step. Pass the shared features through "
            "`z = self.shared_representation(z)` before the task heads, or use mode='parameters'."
        )
    if not z.requires_grad:
        raise RuntimeError(
            f"{owner}(mode='representation'): the tensor marked with shared_representation() does not require "
            "grad (it is detached from the encoder). Mark the encoder's output itself."
        )
    return z


# ---------------------------------------------------------------------------------------------- AMP
def grad_scale(trainer: pl.Trainer | None) -> float | None:
    """The current loss scale of the Trainer's GradScaler (``precision="16-mixed"``), else ``None``."""
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


# ---------------------------------------------------------------------------------------------- engine
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
    columns. ``scale`` (the AMP loss scale) multiplies the backward's seed and divides the result.
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


def representation_gradients(
    outputs: Tensor, z: Tensor, *, batched: bool = True, scale: float | None = None
) -> Tensor:
    """Gradients ``[T, *z.shape]`` (float32 or wider) of ``outputs [T]`` w.r.t. the representation ``z``."""
    J = jacobian(outputs, [z], batched=batched, scale=scale)
    return J.reshape(outputs.shape[0], *z.shape)


class JacobianEngine:
    """Computes Jacobians by one batched backward, and falls back to a per-task loop for good (with one
    warning) the first time the batched pass fails (an operation without a ``vmap`` batching rule).

    Args:
        method: ``"auto"`` (batched, loop fallback), ``"batched"`` (never fall back) or ``"loop"``.
        owner: name used in the warning.
    """

    def __init__(self, method: str = "auto", owner: str = "strategy") -> None:
        if method not in ("auto", "batched", "loop"):
            raise ValueError(f"jacobian method must be 'auto', 'batched' or 'loop', got {method!r}.")
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


def gramian(J: Tensor) -> Tensor:
    """``J Jᵀ`` in at least float32 (``[T, T]``) of a ``[T, N]`` matrix (or ``[T, ...]``, flattened)."""
    J = J.reshape(J.shape[0], -1)
    if J.dtype not in (torch.float32, torch.float64):
        J = J.float()
    return J @ J.T


# ---------------------------------------------------------------------------------------------- .grad
def flatten_grads(params: Iterable[Tensor]) -> Tensor:
    """The ``.grad`` of ``params`` flattened and concatenated (zeros where ``.grad`` is ``None``)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


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


def add_to_grad(vector: Tensor, params: Sequence[Tensor]) -> None:
    """Accumulate a flat ``[P]`` vector into the ``.grad`` of ``params`` (creating it where ``None``)."""
    for p, g in zip(params, unflatten(vector, params)):
        g = g.to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)


# ---------------------------------------------------------------------------------------------- DDP
def reduce_mean_(trainer: pl.Trainer | None, tensor: Tensor) -> Tensor:
    """Average ``tensor`` over the Trainer's ranks with one all-reduce (may reuse ``tensor``'s memory).

    The identity on one process. Every rank must call it (a collective).
    """
    if trainer is None or trainer.world_size <= 1:
        return tensor
    return trainer.strategy.reduce(tensor.detach(), reduce_op="mean")


def world_size(trainer: Any) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)
