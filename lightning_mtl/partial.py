"""Partial labels: tasks labelled on some samples of a batch, or on none.

A task declared ``Task(name, partial=True)`` may be missing from what ``task_losses`` returns (or be ``None``)
on a batch that has no label for it. A task labelled on only some samples returns :func:`masked_mean`: the mean
over the labelled entries, carrying their count, so that the module combines it **exactly** over DDP ranks
(and over the parts of a batch): the task's loss is ``Σ_ranks total / Σ_ranks count``, the mean over every
labelled sample of the global batch, not a mean of per-rank means.

How it is exact (:func:`combine_over_ranks`): with ``R`` ranks, rank ``r`` holding ``total_r`` (the sum of its
labelled samples' losses) and ``count_r``, one all-reduce gives the means ``T̄ = Σ total_r / R`` and
``C̄ = Σ count_r / R``; rank ``r`` back-propagates ``total_r / C̄``, whose mean over ranks (what DDP's gradient
averaging computes) is ``Σ total_r / Σ count_r``; the global loss every strategy sees is ``T̄ / C̄``. A task
with ``C̄ = 0`` (labelled on no rank) is *absent* for the step: loss 0, no gradient, and the strategy is told
(``StepContext.present``) so that its weight is 0 and its state for that task stays untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mtl.checks import stack_losses
from lightning_mtl.step import reduce_mean

__all__ = [
    "MaskedMean",
    "combine_over_ranks",
    "combine_part_losses",
    "combine_parts_over_ranks",
    "masked_mean",
    "stack_partial",
    "unpack_partial",
]


class MaskedMean:
    """A mean over the labelled entries of a batch that carries their count (see :func:`masked_mean`).

    Attributes:
        total: the sum of the labelled entries' losses (a scalar attached to the graph).
        count: how many entries were labelled (a float scalar tensor, no gradient).
    """

    __slots__ = ("count", "total")

    def __init__(self, total: Tensor, count: Tensor) -> None:
        self.total = total
        self.count = count

    @property
    def value(self) -> Tensor:
        """The mean ``total / count`` (0 when nothing is labelled)."""
        return self.total / self.count.clamp_min(1)

    def __mul__(self, factor: float | Tensor) -> MaskedMean:
        """The loss scaled by a number (or a 0-d tensor): ``(c · total) / count``."""
        return MaskedMean(self.total * factor, self.count)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float | Tensor) -> MaskedMean:
        return MaskedMean(self.total / divisor, self.count)

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        return f"MaskedMean(value={float(self.value):.6g}, count={float(self.count):g})"


def masked_mean(values: Tensor, mask: Tensor | None = None) -> MaskedMean:
    """The mean of ``values`` over the entries where ``mask`` is true, carrying the count.

    Return it from ``task_losses`` for a task labelled on only some samples: the module then combines the task
    over ranks (and batch parts) as one mean over all labelled entries. Entries outside the mask never reach the
    *value*, even when they are NaN or inf. Their *gradient* is zero only if the operations that made ``values``
    have finite derivatives there: an unlabelled target stored as NaN makes ``(pred − nan)²``'s derivative NaN, and
    NaN × 0 is NaN. Fill unlabelled targets before computing the per-sample loss, e.g.
    ``target = torch.where(mask, target, 0)``.

    Args:
        values: per-sample (or per-element) losses, e.g. ``F.mse_loss(pred, target, reduction="none")``, shape
            ``[N, ...]``.
        mask: bool (or 0/1) labelled-entry mask, of ``values``' shape or of its leading dimensions (``[N]`` for
            ``[N, H, W]`` values: every element of a labelled sample counts). ``None``: every entry.
    """
    if not isinstance(values, Tensor):
        raise TypeError(
            f"masked_mean: values must be a tensor of per-sample losses, got {type(values).__name__}."
        )
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    if not isinstance(mask, Tensor):
        raise TypeError(f"masked_mean: mask must be a bool tensor (or None), got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("masked_mean: a numeric mask must hold only 0 and 1; pass a bool mask.")
        mask = mask != 0
    if mask.dim() > values.dim() or tuple(values.shape[: mask.dim()]) != tuple(mask.shape):
        raise ValueError(
            f"masked_mean: mask of shape {tuple(mask.shape)} does not match values of shape {tuple(values.shape)}: "
            "it must have the values' shape or that of their leading dimensions (e.g. [N] for [N, ...])."
        )
    mask = mask.reshape(tuple(mask.shape) + (1,) * (values.dim() - mask.dim())).expand_as(values)
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    count = mask.sum().to(torch.float32)
    return MaskedMean(total, count)


def unpack_partial(losses: Any, tasks: Sequence[Any]) -> tuple[Any, list[str], dict[str, Tensor]]:
    """``task_losses``' mapping with each :class:`MaskedMean` replaced by its total; the names of the *absent*
    tasks (declared ``partial`` and missing or ``None``: left out of the mapping); and the counts of the masked
    means by task name. A task that is not ``partial`` keeps the strict checks (a missing one is an error of the
    stacking, which also rejects what is not a mapping)."""
    if not isinstance(losses, Mapping):
        return losses, [], {}
    values = dict(losses)
    absent: list[str] = []
    counts: dict[str, Tensor] = {}
    for task in tasks:
        value = values.get(task.name)
        if value is None and getattr(task, "partial", False):
            values.pop(task.name, None)
            absent.append(task.name)
        elif isinstance(value, MaskedMean):
            values[task.name] = value.total
            counts[task.name] = value.count.detach().float().reshape(())
    return values, absent, counts


def combine_over_ranks(trainer: Any, totals: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The exact combination of per-rank totals ``[T]`` (attached) and counts ``[T]``: returns this rank's share
    ``total_r / C̄`` ``[T]`` (attached; its rank mean is the global loss), the global losses ``T̄ / C̄``
    ``[T]`` (detached; 0 for an absent task) and the mean counts ``C̄`` ``[T]``. One all-reduce of ``2T`` values."""
    T = totals.shape[0]
    both = reduce_mean(trainer, torch.cat([totals.detach().float(), counts.float()]))
    mean_totals, mean_counts = both[:T], both[T:]
    safe = torch.where(mean_counts > 0, mean_counts, torch.ones_like(mean_counts))
    local = totals / safe.to(totals.dtype)
    return local, mean_totals / safe, mean_counts


def combine_parts_over_ranks(
    trainer: Any, totals: Tensor, counts: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`combine_over_ranks` for the ``k`` disjoint parts of a batch (independent gradient samples: MoDo,
    SDMGrad), one all-reduce of ``2kT`` values. ``totals`` ``[k, T]`` (attached) and ``counts`` ``[k, T]`` are
    each part's labelled totals and counts on this rank. Returns each part's share ``total_{p,r} / C̄_p``
    ``[k, T]`` (attached; its rank mean is the part's labelled mean over the union of the ranks' part ``p``),
    the whole batch's share ``Σ_p total_{p,r} / Σ_p C̄_p`` ``[T]`` (attached; its rank mean is the mean over
    every labelled sample of the global batch), the global losses ``[T]`` (detached), the whole batch's mean
    counts ``[T]`` and each part's mean counts ``[k, T]``."""
    k, T = totals.shape
    both = reduce_mean(trainer, torch.cat([totals.detach().float().reshape(-1), counts.float().reshape(-1)]))
    mean_totals, part_counts = both[: k * T].reshape(k, T), both[k * T :].reshape(k, T)
    whole_counts = part_counts.sum(0)
    part_safe = torch.where(part_counts > 0, part_counts, torch.ones_like(part_counts))
    whole_safe = torch.where(whole_counts > 0, whole_counts, torch.ones_like(whole_counts))
    parts = totals / part_safe.to(totals.dtype)
    whole = totals.sum(0) / whole_safe.to(totals.dtype)
    return parts, whole, mean_totals.sum(0) / whole_safe, whole_counts, part_counts


def stack_partial(
    losses: Any,
    tasks: Sequence[Any],
    device: torch.device,
    stage: str,
    training: bool,
    size: int,
    attached_zero: Callable[[], Tensor],
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``task_losses``' output with partial labels: the labelled totals ``[T]`` (0 for an absent task), the counts
    ``[T]`` and the present tasks' losses by name.

    A :class:`MaskedMean` gives its total and count. A plain loss (not a ``masked_mean``) is the mean over the
    batch's ``size`` samples: its total is ``size`` times it and its count ``size``, so that plain losses are
    size-weighted across ranks and batches as without partial labels, and logged as ``size`` labelled samples.
    With no task labelled, ``attached_zero()`` (a zero attached to the model) fills the totals, so that every rank
    still back-propagates.
    """
    names = [task.name for task in tasks]
    values, absent, masked = unpack_partial(losses, tasks)
    present = [n for n in names if n not in absent]
    if present:
        rows = dict(zip(present, stack_losses(values, present, device, stage, training).unbind()))
        zero = next(iter(rows.values())).detach().new_zeros(())
    else:
        rows, zero = {}, attached_zero()
    plain = [n in rows and n not in masked for n in names]
    stacked = torch.stack([rows[n] * size if p else rows.get(n, zero) for n, p in zip(names, plain)])
    full = torch.full((), float(size), device=stacked.device)
    counts = torch.stack(
        [
            masked[n].to(stacked.device) if n in masked else (full if p else full * 0)
            for n, p in zip(names, plain)
        ]
    )
    return stacked, counts, {n: values[n] for n in present}


def combine_part_losses(
    trainer: Any, part_losses: Sequence[Tensor], part_counts: Sequence[Tensor | None], sizes: Sequence[int]
) -> tuple[Tensor, list[Tensor], Tensor, Tensor | None, Tensor | None]:
    """The losses of a batch's ``k`` disjoint parts (independent gradient samples: MoDo, SDMGrad), each part's
    ``[T]`` attached, with its labelled counts (``None``: no partial labels in that part) and its size.

    Returns ``(whole, parts, global_losses, mean_counts, mean_part_counts)``: the whole batch's ``[T]`` (attached),
    each part's ``[T]`` (attached), the global losses ``[T]`` (detached, identical on every rank), and with partial
    labels the whole batch's ``[T]`` and each part's ``[k, T]`` labelled counts averaged over ranks (``None``
    otherwise). Without partial labels the whole batch's losses are the parts' size-weighted mean. With them each
    part's loss is its labelled mean over the union of the ranks' part, exact over ranks
    (:func:`combine_parts_over_ranks`); a part without partial losses counts each task as the part's size, as
    :func:`stack_partial` counts a plain loss.
    """
    if all(c is None for c in part_counts):
        n = sum(sizes)
        whole = sum((L * (size / n) for L, size in zip(part_losses, sizes)), part_losses[0].new_zeros(()))
        return whole, list(part_losses), reduce_mean(trainer, whole.detach()), None, None
    totals = torch.stack(
        [L if c is not None else L * size for L, c, size in zip(part_losses, part_counts, sizes)]
    )
    counts = torch.stack(
        [
            c.to(L) if c is not None else torch.full_like(L, float(size))
            for L, c, size in zip(part_losses, part_counts, sizes)
        ]
    )
    parts, whole, global_losses, mean_counts, mean_part_counts = combine_parts_over_ranks(
        trainer, totals, counts
    )
    return whole, list(parts.unbind(0)), global_losses, mean_counts, mean_part_counts
