"""Per-task gradients of an FSDP1 model (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``): the Gramian
flat shard by flat shard, ``Jᵀw`` per shard.

FSDP1 flattens the parameters of each wrapped unit into one ``FlatParameter`` of ``N`` elements (the unit's
parameters in order, with alignment padding between them when ``use_orig_params=True``), and rank ``r`` of ``R``
keeps elements ``[r·c, min((r + 1)·c, N))`` with ``c = ⌈N/R⌉`` (``torch.chunk``'s split of the flat vector). During
the forward and the backward the flat parameter is unsharded: its ``N`` elements are the leaf that every
parameter of the unit is a view of, and after the backward FSDP reduce-scatters its gradient, averaged over the
ranks, into the shard. The same math as FSDP2's (:mod:`~lightning_mtl.gradients.sharded`) therefore applies to
each unit's flat parameter seen as one one-dimensional parameter:

1. :meth:`FlatShards.jacobian`: this rank's per-task gradients w.r.t. the unsharded flat parameters of the units
   that hold shared parameters (the columns of the elements that are not shared — other parameters of the unit,
   padding — set to zero), reduce-scattered like FSDP's own gradients: this rank keeps ``J_s [T, P_s]``;
2. :func:`~lightning_mtl.gradients.sharded.sharded_gramian`: ``G = Σ_s J_s J_sᵀ`` by one all-reduce;
3. :meth:`FlatShards.term`: a scalar whose gradient w.r.t. the unsharded flat parameters, once FSDP has averaged
   it, is ``J_sᵀc`` on every rank's shard (the correction ``Jᵀ(w − h)`` of the one backward).

FSDP1 runs hooks in every backward that passes through a unit's output: the pre-backward hook prepares the
flat parameter's gradient (it moves an existing sharded gradient aside) and queues a final callback that
reshards every unit when that backward ends — which would free the unsharded parameters that the step's real
backward still needs. The per-task backward is therefore taken with the hooks marked as already run for this
backward (:func:`~lightning_mtl.fsdp1.quiet_fsdp_hooks`): FSDP's state is what it was after the forward, and the
real backward runs the hooks as usual.

Requirements. The parameters must stay unsharded between the forward and the backward:
``sharding_strategy="SHARD_GRAD_OP"`` (ZeRO-2) for every unit, as FSDP2 needs ``reshard_after_forward=False``
(``FULL_SHARD`` frees them after the forward; ``HYBRID_SHARD`` also replicates across nodes). ``NO_SHARD`` is only
accepted on one rank (several ranks without sharding: use DDP). FSDP must average over the default process group.
With ``use_orig_params=True`` (Lightning's default) ``shared_parameters()`` may name any of the original
parameters; with ``use_orig_params=False`` it names the units' flat parameters, each shared as a whole. Reads
FSDP1's private state (``FlatParameter``'s layout, the handles' hook flags), checked on torch 2.13.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_mtl.fsdp1 import quiet_fsdp_hooks
from lightning_mtl.gradients.jacobian import JacobianEngine
from lightning_mtl.gradients.sharded import ShardLayout, _blocks, _Inject, reduce_scatter_rows

__all__ = ["FlatShards"]


@dataclass(frozen=True)
class _Unit:
    """One FSDP1 unit whose flat parameter holds shared parameters."""

    flat_param: Tensor
    layout: ShardLayout  # the unsharded flat parameter [N] over the ranks
    columns: Tensor | None  # bool [N]: the shared elements (None: all of them)


class FlatShards:
    """The shared parameters of an FSDP1 model as its units' flat shards; what the gradient window needs.

    Build it with :meth:`of` after the forward (the units are lazily initialised by then).
    """

    def __init__(self, units: Sequence[_Unit], all_units: Sequence[nn.Module]) -> None:
        self._units = list(units)
        self._all_units = list(all_units)

    @classmethod
    def of(cls, units: Sequence[nn.Module], params: Sequence[Tensor], owner: str) -> FlatShards:
        """The units of ``units`` (every FSDP1 instance of the model) that hold ``params``, with a clear error
        for a layout the exact computation does not cover."""
        from torch.distributed.fsdp._flat_param import HandleShardingStrategy

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        handles = []
        for u in units:
            handle = getattr(u, "_handle", None)
            if handle is None:
                continue
            strategy = handle._sharding_strategy
            allowed = (HandleShardingStrategy.SHARD_GRAD_OP,) + (
                (HandleShardingStrategy.NO_SHARD,) if world == 1 else ()
            )
            if strategy not in allowed:
                raise RuntimeError(
                    f"{owner}: an FSDP1 unit ({type(u.module).__name__}) uses sharding_strategy {strategy.name}; the "
                    "per-task gradients of a sharded model need the parameters unsharded from the forward to the "
                    "backward and sharded over all the ranks: use sharding_strategy='SHARD_GRAD_OP' (e.g. "
                    "FSDPStrategy(sharding_strategy='SHARD_GRAD_OP')), or DDP, or mode='representation', or a "
                    "loss-based strategy."
                )
            group = getattr(u, "process_group", None)
            if group is not None and world > 1 and dist.get_world_size(group) != world:
                raise RuntimeError(
                    f"{owner}: an FSDP1 unit ({type(u.module).__name__}) shards over {dist.get_world_size(group)} "
                    f"of the {world} ranks; the sharded per-task gradients need FSDP over all the ranks."
                )
            handles.append(handle)
        # id(param) -> (its unit's handle, its index among the unit's parameters; None for the flat parameter)
        where: dict[int, tuple[Any, int | None]] = {}
        for handle in handles:
            fp = handle.flat_param
            where[id(fp)] = (handle, None)
            for j, p in enumerate(getattr(fp, "_params", None) or ()):
                where[id(p)] = (handle, j)
                # between the forward and the backward the module holds a view of the unsharded flat parameter
                info = fp._param_infos[j]
                where[id(getattr(info.module, info.param_name))] = (handle, j)
        selected: dict[int, tuple[Any, set[int] | None]] = {}
        for k, p in enumerate(params):
            if id(p) not in where:
                raise ValueError(
                    f"{owner}: shared parameter {k} (shape {tuple(p.shape)}) belongs to no FSDP1 unit of the model "
                    "(an ignored module?) nor is a unit's flat parameter. With FSDP1, shared_parameters() must "
                    "return the original parameters (use_orig_params=True, Lightning's default) or the units' "
                    "flat parameters."
                )
            handle, j = where[id(p)]
            entry = selected.setdefault(id(handle), (handle, set()))
            if j is None or entry[1] is None:
                selected[id(handle)] = (handle, None)
            else:
                entry[1].add(j)
        out = []
        for handle in handles:  # the units' order: every rank the same
            if id(handle) not in selected:
                continue
            fp = handle.flat_param
            N = fp._unpadded_unsharded_size.numel()
            mask = _shared_mask(fp, selected[id(handle)][1], N)
            out.append(_Unit(fp, ShardLayout((torch.Size([N]),), rank, world), mask))
        if not out:
            raise ValueError(f"{owner}: no shared parameter; shared_parameters() returned none.")
        return cls(out, units)

    @property
    def numel(self) -> int:
        """The elements of the units' unsharded flat parameters (the columns of the per-rank Jacobian)."""
        return sum(u.layout.numel for u in self._units)

    @property
    def local_numel(self) -> int:
        """``P_s``: the columns of this rank's shard ``J_s``."""
        return sum(u.layout.local_numel for u in self._units)

    def jacobian(
        self, losses: Tensor, engine: JacobianEngine, scale: float | None, block_numel: int | None = None
    ) -> Tensor:
        """``J_s [T, P_s]``: this rank's shard of the Jacobian of the rank-averaged ``losses`` (``[T]``, this
        rank's) w.r.t. the shared elements (the others' columns are zero), taken by blocks of units of at most
        ``block_numel`` elements (one batched backward each, graph retained). Every rank must call it."""
        shards = []
        for block in _blocks([u.layout.shapes[0] for u in self._units], block_numel):
            units = [self._units[k] for k in block]
            with quiet_fsdp_hooks(self._all_units):
                J_b = engine(losses, [u.flat_param for u in units], scale)  # [T, ΣN] this rank's, transient
            for u, g in zip(units, J_b.split([u.layout.numel for u in units], dim=1), strict=True):
                if u.columns is not None:
                    g = g * u.columns.to(device=g.device, dtype=g.dtype)
                shards.append(reduce_scatter_rows([g], u.layout))
            del J_b
        return torch.cat(shards, dim=1) if len(shards) > 1 else shards[0]

    def term(self, c_s: Tensor) -> Tensor:
        """A scalar (zero) whose gradient w.r.t. the unsharded flat parameters, once FSDP has averaged it over the
        ``R`` ranks into the shards, is ``c_s`` (``[P_s]``) on this rank's shard: rank ``r`` contributes ``R·c_r``
        on its own elements (one ``N``-sized vector per unit, never ``T × N``)."""
        if c_s.numel() != self.local_numel:
            raise ValueError(
                f"the shard vector has {c_s.numel()} elements, this rank's shards {self.local_numel}."
            )
        total = c_s.new_zeros((), dtype=torch.float32)
        offset = 0
        for u in self._units:
            start, stop = u.layout.rows(0)
            if stop > start:
                g = torch.zeros(u.layout.numel, dtype=u.flat_param.dtype, device=u.flat_param.device)
                g[start:stop] = u.layout.world_size * c_s[offset : offset + stop - start].detach()
                total = total + _Inject.apply(u.flat_param, g)
            offset += stop - start
        return total


def _shared_mask(fp: Tensor, indices: set[int] | None, N: int) -> Tensor | None:
    """The bool mask ``[N]`` of the flat parameter's elements that belong to the original parameters ``indices``
    (``None``: every parameter of the unit; padding is never shared, but its gradient is zero anyway)."""
    numels = getattr(fp, "_numels_with_padding", None)
    padding = getattr(fp, "_is_padding_mask", None)
    if indices is None or numels is None or padding is None:
        return None
    if sum(numels) != N:  # pragma: no cover - another torch's internals
        raise RuntimeError(
            f"FSDP1's flat parameter layout ({sum(numels)} elements) differs from its size {N}."
        )
    mask = torch.zeros(N, dtype=torch.bool)
    offset, j = 0, 0
    for numel, is_padding in zip(numels, padding, strict=True):
        if not is_padding:
            if j in indices:
                mask[offset : offset + numel] = True
            j += 1
        offset += numel
    return None if bool(mask.all()) else mask.to(fp.device)
