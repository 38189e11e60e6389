"""Per-task gradients of a sharded model (FSDP2, ``fully_shard``): the Gramian shard by shard, ``Jᵀw`` per shard.

Long because the layout, the reduce-scatter, the Gramian and the per-shard update must share FSDP2's layout rules,
and each carries the checks that keep it exact.

FSDP2 shards every parameter along its first dimension (``Shard(0)``): of a parameter with ``d`` rows, rank
``r`` of ``R`` holds rows ``[r·c, min((r + 1)·c, d))`` with ``c = ⌈d/R⌉`` (``torch.chunk``'s split; the last
ranks may hold fewer rows or none), and after the backward FSDP reduce-scatters the gradient of the
unsharded parameter, averaged over the ranks, into the shard's ``.grad``. This module does the same with the
``T`` per-task gradients, so that no rank ever holds the Jacobian ``J [T, P]`` of the global batch:

1. :func:`shard_jacobian`: this rank's per-task gradients w.r.t. the *unsharded* parameters (as FSDP
   materialises them during the forward and the backward) by the
   :class:`~lightning_mtl.gradients.jacobian.JacobianEngine`, block of parameters by block (``block_numel``:
   a transient ``T × block`` on this rank), each block reduce-scattered (mean over ranks) like FSDP's own
   gradients: this rank keeps only its shard ``J_s [T, P_s]`` of the global batch's Jacobian;
2. :func:`sharded_gramian`: ``G = Σ_s J_s J_sᵀ``, the local ``T × T`` product (float64) and one all-reduce
   (sum): the exact Gramian of the global batch on every rank (the parameter shards partition the columns
   of ``J``, and a Gramian is additive over a partition of the columns);
3. the update. The weights ``w`` come from ``G`` (identical on every rank). The shared parameters' update
   ``Jᵀw`` restricted to this rank's shard is ``J_sᵀw`` (:func:`shard_combination`) — which is all the
   sharded optimizer needs. ``heads="weighted"`` methods back-propagate ``Σ wᵢLᵢ`` through FSDP and need no
   ``J`` at all. ``heads="plain"`` methods (and the surgery methods, PCGrad, GradVac, whose update is ``Jᵀw``
   for weights computed from ``G``) back-propagate ``Σ hᵢLᵢ`` and give the shared shard ``J_sᵀ(w − h)`` more,
   either in the same backward (:func:`shard_term`: a scalar whose gradient w.r.t. the unsharded parameters,
   once FSDP has averaged it over the ranks, is exactly that vector on every rank's shard — rank ``r`` places
   ``R·c_r`` on its own rows and zeros elsewhere, so a ``P``-sized vector, never ``T × P``) or after it,
   written into the DTensor gradients' local shards (:func:`add_to_shard_grads`).

Requirements. The parameters must be unsharded when the per-task gradients are taken, i.e. after the forward
with ``fully_shard(..., reshard_after_forward=False)`` (``SHARD_GRAD_OP``/ZeRO-2; with resharding after the
forward the unsharded storage is freed until FSDP's pre-backward hook gathers it again). FSDP must average
the gradients over a one-dimensional mesh (its default; not HSDP, not a custom gradient divide factor).
FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) flattens the parameters into one flat
parameter per unit: :mod:`~lightning_mtl.gradients.flat_sharded` applies the same math to the flat parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_mtl.functional import gramian
from lightning_mtl.gradients.jacobian import JacobianEngine
from lightning_mtl.gradients.lean import BLOCK_FRACTION, LEAN_MIN_BYTES, consecutive_blocks

__all__ = [
    "ParameterShards",
    "ShardLayout",
    "add_to_shard_grads",
    "auto_block_numel",
    "check_fsdp_mesh",
    "fsdp_layout",
    "fsdp_sharded",
    "reduce_scatter_rows",
    "shard_combination",
    "shard_jacobian",
    "shard_term",
    "sharded_gramian",
    "sum_over_ranks",
]


@dataclass(frozen=True)
class ShardLayout:
    """FSDP2's ``Shard(0)`` layout of a list of parameters over ``world_size`` ranks, seen from ``rank``.

    Attributes:
        shapes: the parameters' full (unsharded) shapes, in order.
        rank: this rank's index in the sharding group.
        world_size: the sharding group's size ``R``.
    """

    shapes: tuple[torch.Size, ...]
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"ShardLayout needs 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}."
            )
        for k, shape in enumerate(self.shapes):
            if len(shape) == 0:
                raise ValueError(
                    f"ShardLayout: parameter {k} is a 0-dim tensor; FSDP2 shards along dim 0, so give it at "
                    "least one dimension (e.g. shape [1])."
                )

    @classmethod
    def of(cls, params: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> ShardLayout:
        """The layout of ``params`` (full shapes) over ``group`` (default: the world; one rank without
        ``torch.distributed``)."""
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(group), dist.get_world_size(group)
        else:
            rank, world = 0, 1
        return cls(tuple(torch.Size(p.shape) for p in params), rank, world)

    def chunk(self, k: int) -> int:
        """Rows per rank of parameter ``k`` (``⌈d/R⌉``; the padded shard size)."""
        return math.ceil(self.shapes[k][0] / self.world_size)

    def rows(self, k: int, rank: int | None = None) -> tuple[int, int]:
        """The rows ``[start, stop)`` of parameter ``k`` that ``rank`` (default: this rank) holds."""
        r = self.rank if rank is None else rank
        d, c = self.shapes[k][0], self.chunk(k)
        return min(r * c, d), min((r + 1) * c, d)

    def row_numel(self, k: int) -> int:
        """Elements in one row of parameter ``k``."""
        return math.prod(self.shapes[k][1:])

    @property
    def local_numel(self) -> int:
        """``P_s``: the elements of this rank's shards, all parameters together."""
        total = 0
        for k in range(len(self.shapes)):
            start, stop = self.rows(k)
            total += (stop - start) * self.row_numel(k)
        return total

    @property
    def numel(self) -> int:
        """``P``: the elements of the full parameters."""
        return sum(math.prod(s) for s in self.shapes)


def fsdp_layout(params: Sequence[Tensor]) -> ShardLayout:
    """The layout of FSDP2's sharded parameters (DTensors ``Shard(0)`` on a one-dimensional mesh), checked
    against their local shards."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = None
    for k, p in enumerate(params):
        if not isinstance(p, DTensor):
            raise ValueError(
                f"fsdp_layout: parameter {k} (shape {tuple(p.shape)}) is a {type(p).__name__}, not a DTensor: "
                "pass the sharded parameters (those of a fully_shard-ed module outside its forward/backward)."
            )
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"fsdp_layout: parameter {k} is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-d mesh; "
                "only FSDP2's default Shard(0) on a one-dimensional mesh is supported (not HSDP, not "
                "shard_placement_fn)."
            )
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError("fsdp_layout: the parameters are sharded over different meshes.")
    if mesh is None:
        raise ValueError("fsdp_layout: no parameters.")
    layout = ShardLayout(tuple(torch.Size(p.shape) for p in params), mesh.get_local_rank(), mesh.size())
    for k, p in enumerate(params):
        start, stop = layout.rows(k)
        if p.to_local().shape[0] != stop - start:
            raise ValueError(
                f"fsdp_layout: parameter {k} holds {p.to_local().shape[0]} rows on rank {layout.rank}, "
                f"expected {stop - start} (torch.chunk's split of {p.shape[0]} rows over {layout.world_size})."
            )
    return layout


def fsdp_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` or one of its submodules is sharded by FSDP2 (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def check_fsdp_mesh(module: torch.nn.Module, owner: str) -> None:
    """A clear error unless every FSDP2 unit of ``module`` shards over all the ranks of the default group in
    their order (a one-dimensional mesh: not HSDP, not a sub-mesh of a tensor-parallel mesh), which is what the
    sharded engine's reduce-scatter assumes. Reads FSDP2's private state; skipped where it is not found."""
    from torch.distributed.fsdp import FSDPModule

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        try:
            group = m._get_fsdp_state()._fsdp_param_group
            if group is None:
                continue
            info = group.mesh_info
            mesh, size, shard_rank = info.mesh, info.shard_mesh_size, info.shard_mesh_rank
        except AttributeError:  # pragma: no cover - another torch version's internals
            return
        if mesh.ndim != 1 or size != world or shard_rank != rank:
            raise RuntimeError(
                f"{owner}: an FSDP2 unit ({type(m).__name__}) shards over a {mesh.ndim}-d mesh of {size} ranks "
                f"(this rank is {shard_rank} there, {rank} of {world} in the world); the sharded per-task "
                "gradients need fully_shard over a one-dimensional mesh of all the ranks (e.g. "
                "ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1) and "
                "fully_shard(..., mesh=self.device_mesh['data_parallel'])). Use a loss-based strategy or "
                "mode='representation' otherwise."
            )


def reduce_scatter_rows(
    grads: Sequence[Tensor], layout: ShardLayout, group: dist.ProcessGroup | None = None
) -> Tensor:
    """This rank's shard ``[T, P_s]`` of the rank-averaged per-task gradients: ``grads[k]`` (``[T, *shape_k]``
    or ``[T, numel_k]``) are this rank's per-task gradients w.r.t. the full parameter ``k``. One
    reduce-scatter (sum, then ``/R``: FSDP's average) for all the parameters given."""
    R = layout.world_size
    if len(grads) != len(layout.shapes):
        raise ValueError(f"reduce_scatter_rows: {len(grads)} gradients for {len(layout.shapes)} parameters.")
    T = grads[0].shape[0]
    blocks = []
    for k, g in enumerate(grads):
        d, c, n = layout.shapes[k][0], layout.chunk(k), layout.row_numel(k)
        g = g.reshape(T, d, n)
        if c * R != d:
            g = F.pad(g, (0, 0, 0, c * R - d))
        blocks.append(g.reshape(T, R, c * n).transpose(0, 1))  # [R, T, c·n]: rank r's rows in block r
    send = torch.cat(blocks, dim=2).contiguous()
    if R > 1:
        out = send.new_empty(send.shape[1:])
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        try:  # flat: gloo splits the input along its first dimension
            reduce_scatter(out.view(-1), send.view(-1), group=group)
        except (
            RuntimeError,
            NotImplementedError,
        ):  # a backend without reduce-scatter: same sums, more traffic
            dist.all_reduce(send, group=group)
            out = send[layout.rank].clone()
        out = out / R
    else:
        out = send[0]
    pieces, offset = [], 0
    for k in range(len(grads)):
        start, stop = layout.rows(k)
        n = layout.row_numel(k)
        pieces.append(out[:, offset : offset + (stop - start) * n])
        offset += layout.chunk(k) * n
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0].contiguous()


def auto_block_numel(T: int, P: int, itemsize: int = 4) -> int | None:
    """The block size :class:`~lightning_mtl.gradients.TaskGradients` uses on a sharded model: one block (one
    batched backward, a transient local ``T × P``) while ``T·P`` elements take less than
    :data:`~lightning_mtl.gradients.lean.LEAN_MIN_BYTES`, else blocks of an eighth of ``P`` (the lean engine's
    :data:`~lightning_mtl.gradients.lean.BLOCK_FRACTION`: a transient ``T × P/8``, at about ``4.5`` batched
    backward passes for a chain). Depends on ``T`` and ``P`` only: the same on every rank."""
    if T * P * itemsize < LEAN_MIN_BYTES:
        return None
    return max(1, math.ceil(P * BLOCK_FRACTION))


def _blocks(shapes: Sequence[torch.Size], block_numel: int | None) -> list[list[int]]:
    """Consecutive indices of the parameters of ``shapes``, grouped into blocks of at most ``block_numel``
    elements (a larger parameter is a block of its own); one block without a limit."""
    n = len(shapes)
    if block_numel is None:
        return [list(range(n))]
    if block_numel < 1:
        raise ValueError(f"block_numel must be a positive number of elements or None, got {block_numel}.")
    return consecutive_blocks([math.prod(shape) for shape in shapes], block_numel)


def shard_jacobian(
    losses: Tensor,
    params: Sequence[Tensor],
    layout: ShardLayout | None = None,
    *,
    engine: JacobianEngine | None = None,
    scale: float | None = None,
    block_numel: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """This rank's shard ``J_s [T, P_s]`` of the Jacobian of the rank-averaged losses.

    ``losses`` (``[T]``, attached) are this rank's; ``params`` the unsharded parameters the gradients are taken
    of (for an FSDP2 module: its parameters after the forward, with ``reshard_after_forward=False``). The
    per-task gradients are taken by blocks of at most ``block_numel`` elements (one backward per block,
    graph retained; ``None``: one block), each block reduce-scattered at once, so this rank holds at most
    ``T × block`` of the local Jacobian besides ``J_s``. Every rank must call it with the same blocks.
    ``scale``: the AMP loss scale (see :func:`~lightning_mtl.gradients.jacobian.jacobian`).
    """
    params = list(params)
    layout = ShardLayout.of(params, group) if layout is None else layout
    if len(params) != len(layout.shapes) or any(
        torch.Size(p.shape) != s for p, s in zip(params, layout.shapes, strict=True)
    ):
        raise ValueError(
            "shard_jacobian: the parameters' shapes "
            f"{[tuple(p.shape) for p in params]} differ from the layout's {[tuple(s) for s in layout.shapes]}: "
            "pass the unsharded parameters (after the forward, with reshard_after_forward=False)."
        )
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        raise ValueError(
            "shard_jacobian: the parameters are sharded DTensors, not FSDP's unsharded parameters: take the "
            "per-task gradients after the forward of a module sharded with fully_shard(..., "
            "reshard_after_forward=False) (SHARD_GRAD_OP), while the parameters are still unsharded."
        )
    engine = JacobianEngine("auto", owner="shard_jacobian") if engine is None else engine
    shards = []
    for block in _blocks(layout.shapes, block_numel):
        inputs = [params[k] for k in block]
        J_b = engine(losses, inputs, scale)  # [T, P_b] this rank's, transient
        grads = list(J_b.split([p.numel() for p in inputs], dim=1))
        sub = ShardLayout(tuple(layout.shapes[k] for k in block), layout.rank, layout.world_size)
        shards.append(reduce_scatter_rows(grads, sub, group))
        del J_b, grads
    # the blocks are consecutive parameters: reorder nothing, the shard's columns follow the parameters
    return torch.cat(shards, dim=1) if len(shards) > 1 else shards[0]


def sharded_gramian(J_s: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The Gramian ``[T, T]`` (float64) of the global Jacobian from this rank's column shard ``J_s``: the local
    ``J_s J_sᵀ`` and one all-reduce (sum). Every rank of ``group`` must call it."""
    T = J_s.shape[0]
    local = gramian(J_s) if J_s.shape[1] > 0 else torch.zeros(T, T, dtype=torch.float64, device=J_s.device)
    return sum_over_ranks(local, group)


def sum_over_ranks(partial: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The sum over the ranks of ``group`` of ``partial`` (one all-reduce, into a copy): what completes a
    product over the columns of the ranks' shards (``J_s J_s'ᵀ``, squared row norms). ``partial`` itself on
    one rank. Every rank of ``group`` must call it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total
    return partial


def shard_combination(J_s: Tensor, weights: Tensor) -> Tensor:
    """``J_sᵀw`` (``[P_s]``): this rank's shard of the update ``Jᵀw``."""
    return weights.to(J_s) @ J_s


def _split_shard(c_s: Tensor, layout: ShardLayout) -> list[tuple[int, int, Tensor]]:
    """``(start, stop, rows)`` of each parameter's shard in the flat shard vector ``c_s``."""
    if c_s.numel() != layout.local_numel:
        raise ValueError(
            f"the shard vector has {c_s.numel()} elements, this rank's shards {layout.local_numel}."
        )
    out, offset = [], 0
    for k, shape in enumerate(layout.shapes):
        start, stop = layout.rows(k)
        n = (stop - start) * layout.row_numel(k)
        out.append((start, stop, c_s[offset : offset + n].view(stop - start, *shape[1:])))
        offset += n
    return out


class _Inject(torch.autograd.Function):
    """``0``, with the gradient ``g`` w.r.t. ``p``: never reads ``p`` (FSDP may have freed its unsharded storage
    after the per-task backward; its pre-backward hook gathers it again for the real backward)."""

    @staticmethod
    def forward(ctx, p: Tensor, g: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(g)
        return g.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (g,) = ctx.saved_tensors
        return grad_output.to(g.dtype) * g, None


def shard_term(params: Sequence[Tensor], c_s: Tensor, layout: ShardLayout) -> Tensor:
    """A scalar (zero) whose gradient w.r.t. the unsharded ``params``, once FSDP has averaged it over the ``R``
    ranks into the shards, is ``c_s`` on this rank's shard (and each rank's own vector on its shard): rank ``r``
    contributes ``R·c_r`` on its own rows and zeros elsewhere (one ``P``-sized vector, never ``T × P``). Add
    it to the loss of the one backward; it does not read the parameters' values."""
    R = layout.world_size
    total = c_s.new_zeros((), dtype=torch.float32)
    for p, (start, stop, rows) in zip(params, _split_shard(c_s, layout), strict=True):
        if stop > start:
            g = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            g[start:stop] = R * rows.detach()
            total = total + _Inject.apply(p, g)
    return total


def add_to_shard_grads(sharded_params: Sequence[Tensor], c_s: Tensor, layout: ShardLayout) -> None:
    """Add ``c_s`` (``[P_s]``) to the local shards of the sharded parameters' gradients (DTensors, after
    FSDP's backward; a missing gradient starts at zero)."""
    from torch.distributed.tensor import DTensor

    for p, (_, _, rows) in zip(sharded_params, _split_shard(c_s, layout), strict=True):
        if p.grad is None:
            local = p.to_local() if isinstance(p, DTensor) else p
            grad = torch.zeros_like(local)
            p.grad = (
                DTensor.from_local(grad, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                if isinstance(p, DTensor)
                else grad
            )
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        g.add_(rows.to(g.dtype))


class ParameterShards:
    """FSDP2: the shared parameters (unsharded, as after the forward) and their ``Shard(0)`` layout; what the
    gradient window needs (the FSDP1 counterpart is :class:`~lightning_mtl.gradients.flat_sharded.FlatShards`)."""

    def __init__(self, params: Sequence[Tensor], layout: ShardLayout | None = None) -> None:
        self.params = list(params)
        self.layout = ShardLayout.of(self.params) if layout is None else layout

    @property
    def numel(self) -> int:
        """``P``: the elements of the full parameters."""
        return self.layout.numel

    def jacobian(
        self, losses: Tensor, engine: JacobianEngine, scale: float | None, block_numel: int | None = None
    ) -> Tensor:
        """``J_s [T, P_s]`` (:func:`shard_jacobian`)."""
        return shard_jacobian(
            losses, self.params, self.layout, engine=engine, scale=scale, block_numel=block_numel
        )

    def term(self, c_s: Tensor) -> Tensor:
        """The scalar of :func:`shard_term`: ``c_s`` on every rank's shard after FSDP's averaging."""
        return shard_term(self.params, c_s, self.layout)
