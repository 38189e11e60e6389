"""The Gramian ``G = J Jᵀ`` of the task losses without ever holding the Jacobian ``J [T, P]``.

Every Gramian-expressible method (``needs == "gramian"``: MGDA, UPGrad, DualProj, CAGrad, IMTL-G, Nash-MTL,
Aligned-MTL, FairGrad, PCGrad, GradVac, ...) only reads ``G``, and ``G = Σ_b J_b J_bᵀ`` over any partition of
the parameters into blocks ``b`` (the columns of ``J``). Two routes compute it holding one block's ``J_b`` at a
time:

- **hooks** (one batched backward, the default on one process): a ``torch.vmap`` over the ``T`` rows of the
  identity runs ``torch.autograd.grad`` once; a tensor hook on every parameter receives that parameter's
  per-task gradients ``[T, *shape]`` as soon as the engine has summed them over every use of the parameter
  (tied weights included), adds ``J_p J_pᵀ`` to the Gramian and hands autograd back a zero-storage tensor,
  so ``J_p`` is freed at once. The hook leaves ``vmap`` through a ``torch.autograd.Function`` with a ``vmap``
  rule (which sees the whole batch of ``T`` rows): the technique of TorchJD's ``autogram`` engine (Quinton &
  Rey, arXiv:2406.16232, Algorithm 3), applied to parameters rather than module outputs so that it needs no
  forward hooks and works on a graph that is already built. Time: that of the full engine's batched
  backward (less the concatenation of ``J``).
- **blocks** (deterministic order; used under DDP with ``sync="exact"``, and as the fallback when the
  ``vmap``-ed backward fails): consecutive parameters are grouped into blocks of at most an eighth of ``P``
  (or the largest parameter), and each block's ``J_b`` is taken by its own batched backward (the
  :class:`~lightning_mtl.gradients.jacobian.JacobianEngine`, with its per-task loop fallback), optionally
  reduced over ranks, turned into ``J_b J_bᵀ`` and dropped. Time: each block's backward re-traverses the
  graph above it, about ``(k + 1)/2`` batched backward passes for ``k`` blocks of a chain.

Exactness. ``G`` is quadratic in ``J``: the Gramian of a global batch is not the mean of per-rank or per-micro-
batch Gramians. The caller therefore hands one loss vector for the whole accumulation window (the sum of the
micro-batches' attached losses, whose graphs are kept until the window's backward anyway: autograd sums the
micro-batches' gradients for free), and under DDP a ``reduce`` of each block ``J_b`` over ranks before its
product — one all-reduce per block, in the parameters' order on every rank.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_mtl.functional import gramian
from lightning_mtl.gradients.jacobian import JacobianEngine

#: ``jacobian="auto"`` never chooses the lean engine when ``J`` would take less than this (today's engine, and
#: today's numbers, for every small model)...
LEAN_MIN_BYTES = 256 * 2**20
#: ...always chooses it when ``J`` would take more than this...
LEAN_ALWAYS_BYTES = 2**30
#: ...and in between when ``J`` would take more than this fraction of its device's free memory.
LEAN_FREE_FRACTION = 0.25
#: the blocks route groups at most this fraction of the parameters' elements into one block
BLOCK_FRACTION = 1 / 8

Reduce = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------- the rule
def free_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of ``/proc/meminfo`` (or
    ``sysconf``) on the CPU; ``None`` when unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - a CUDA device that cannot be queried
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    try:  # pragma: no cover - not Linux
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def prefers_lean(num_tasks: int, num_params: int, device: torch.device, element_size: int = 4) -> bool:
    """The rule of ``jacobian="auto"`` for Gramian-only methods: the lean engine when the full Jacobian
    (``T·P·element_size`` bytes) would exceed :data:`LEAN_ALWAYS_BYTES` (1 GiB), or would exceed
    :data:`LEAN_MIN_BYTES` (256 MiB) and a quarter of the free memory of its device; today's engine otherwise."""
    nbytes = num_tasks * num_params * element_size
    if nbytes < LEAN_MIN_BYTES:
        return False
    if nbytes > LEAN_ALWAYS_BYTES:
        return True
    free = free_memory(device)
    return free is not None and nbytes > LEAN_FREE_FRACTION * free


# ---------------------------------------------------------------------------------------------- hooks route
class _Accumulator:
    """The running ``Σ J_p J_pᵀ`` (float64) of the hooks route."""

    def __init__(self) -> None:
        self.G: Tensor | None = None
        self.calls = 0

    def add(self, J: Tensor) -> None:
        block = gramian(J.reshape(J.shape[0], -1))
        self.G = block if self.G is None else self.G + block
        self.calls += 1


class _BlockGramian(torch.autograd.Function):
    """Identity-shaped sink of a parameter's gradient: adds the gradient's Gramian to the accumulator and
    returns zeros that take no storage. Under ``torch.vmap`` its ``vmap`` rule sees all ``T`` rows at once."""

    @staticmethod
    def forward(grad: Tensor, acc: _Accumulator) -> Tensor:  # one row (not under vmap)
        acc.add(grad.reshape(1, -1))
        return grad.new_zeros(()).expand(grad.shape)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, None], grad: Tensor, acc: _Accumulator
    ) -> tuple[Tensor, None]:
        dim = in_dims[0]
        if (
            dim is None
        ):  # the same gradient for every row (cannot happen for a backward seeded by the identity)
            rows = grad.reshape(1, -1).expand(info.batch_size, -1)
            shape = grad.shape
        else:
            rows = grad.movedim(dim, 0)
            shape = rows.shape[1:]
        acc.add(rows.reshape(info.batch_size, -1))
        return grad.new_zeros(()).expand(shape), None


def _sink(acc: _Accumulator, grad: Tensor) -> Tensor:
    return _BlockGramian.apply(grad, acc)


def gramian_by_hooks(losses: Tensor, params: Sequence[Tensor], *, scale: float | None = None) -> Tensor:
    """``G = J Jᵀ`` (``[T, T]``, float64) of ``losses [T]`` w.r.t. ``params`` by one ``vmap``-ed backward whose
    parameter hooks turn each parameter's per-task gradients into its Gramian block and free them.

    The graph is retained. ``scale`` (the AMP loss scale) multiplies the backward's seed and divides ``G`` by
    its square. No DDP hook fires (``torch.autograd.grad``). Raises ``RuntimeError`` when an operation of the
    graph cannot be ``vmap``-ed (the caller falls back to :func:`gramian_by_blocks`).
    """
    if losses.ndim != 1:
        raise ValueError(
            f"gramian_by_hooks expects a 1-d tensor of T losses, got shape {tuple(losses.shape)}."
        )
    T = losses.shape[0]
    s = 1.0 if scale is None else float(scale)
    acc = _Accumulator()
    inputs = list(params)

    def backward(row: Tensor) -> Tensor:
        torch.autograd.grad(losses, inputs, grad_outputs=row, retain_graph=True, allow_unused=True)
        return row.sum() * 0  # the gradients themselves are the hooks' zeros: nothing to return

    handles = [p.register_hook(partial(_sink, acc)) for p in inputs]
    try:
        torch.vmap(backward)(torch.eye(T, device=losses.device, dtype=losses.dtype) * s)
    finally:
        for h in handles:
            h.remove()
    G = acc.G if acc.G is not None else torch.zeros(T, T, dtype=torch.float64, device=losses.device)
    return G / (s * s) if s != 1.0 else G


# ---------------------------------------------------------------------------------------------- blocks route
def parameter_blocks(params: Sequence[Tensor], max_elements: int | None = None) -> list[list[Tensor]]:
    """Consecutive groups of ``params`` of at most ``max_elements`` elements each (default: an eighth of the
    total, or the largest parameter when it is larger); a larger parameter is a block of its own."""
    if max_elements is None:
        total = sum(p.numel() for p in params)
        max_elements = max(math.ceil(total * BLOCK_FRACTION), max((p.numel() for p in params), default=1))
    return [
        [params[k] for k in block] for block in consecutive_blocks([p.numel() for p in params], max_elements)
    ]


def consecutive_blocks(numels: Sequence[int], max_elements: int) -> list[list[int]]:
    """The indices of consecutive items of sizes ``numels``, grouped greedily into blocks of at most
    ``max_elements`` (an item larger than that is a block of its own)."""
    blocks: list[list[int]] = []
    size = 0
    for k, numel in enumerate(numels):
        if blocks and size + numel <= max_elements:
            blocks[-1].append(k)
            size += numel
        else:
            blocks.append([k])
            size = numel
    return blocks


def gramian_by_blocks(
    losses: Tensor,
    params: Sequence[Tensor],
    engine: JacobianEngine,
    *,
    scale: float | None = None,
    reduce: Reduce | None = None,
    max_elements: int | None = None,
) -> Tensor:
    """``G = Σ_b J_b J_bᵀ`` (``[T, T]``, float64) of ``losses [T]`` w.r.t. ``params``, one block ``J_b`` at a
    time (see :func:`parameter_blocks`), each by its own batched backward of ``engine``. ``reduce`` (e.g. the
    mean over DDP ranks) is applied to every block before its product, in the same order on every rank."""
    G: Tensor | None = None
    for block in parameter_blocks(params, max_elements):
        J = engine(losses, block, scale).detach()
        if reduce is not None:
            J = reduce(J)
        part = gramian(J)
        del J
        G = part if G is None else G + part
    assert G is not None, "no parameters"
    return G


# ---------------------------------------------------------------------------------------------- the engine
class LeanGramian:
    """The lean engine of :class:`~lightning_mtl.gradients.TaskGradients`: the hooks route on one process (and
    with ``sync="local"``), the blocks route when each block must be reduced over ranks; falls back for good
    (one warning) to the blocks route the first time the ``vmap``-ed backward fails.

    Args:
        engine: the Jacobian engine of the blocks route (its ``"loop"`` method also skips the hooks route).
        owner: name used in the warning.
    """

    def __init__(self, engine: JacobianEngine, owner: str = "strategy") -> None:
        self.engine = engine
        self.owner = owner
        self.hooks = engine.method != "loop"

    def __call__(
        self,
        losses: Tensor,
        params: Sequence[Tensor],
        scale: float | None = None,
        reduce: Reduce | None = None,
    ) -> Tensor:
        if reduce is None and self.hooks:
            try:
                return gramian_by_hooks(losses, params, scale=scale)
            except RuntimeError as err:
                warnings.warn(
                    f"{self.owner}: the lean engine's batched (vmap) backward failed "
                    f"({str(err).splitlines()[0][:200]}); computing the Gramian one parameter block at a time "
                    "from now on (slower, as lean in memory).",
                    stacklevel=3,
                )
                self.hooks = False
        return gramian_by_blocks(losses, params, self.engine, scale=scale, reduce=reduce)


def combination_grads(
    losses: Tensor, coefficients: Tensor, params: Sequence[Tensor], scale: float | None = None
) -> list[Tensor]:
    """``∇_θ Σᵢ cᵢ·lossesᵢ`` (``= Jᵀc``) for each of ``params`` by one plain backward (graph retained; zeros for
    a parameter the losses do not reach), under the AMP ``scale`` like the Jacobian: the lean engine's heads
    correction, without ``J``."""
    s = 1.0 if scale is None else float(scale)
    total = (coefficients.to(losses) * losses).sum() * s
    grads = torch.autograd.grad(total, list(params), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else (g / s if s != 1.0 else g) for p, g in zip(params, grads)]
