"""Disjoint parts of one training batch, for the methods that need independent gradient samples per step
(MoDo, SDMGrad): :func:`split_batch`.

A batch is split along dim 0 into ``k`` contiguous parts of sizes as equal as possible (``torch.tensor_split``).
Tensors are split; mappings, lists, tuples and named tuples are split element-wise, keeping their type; a
sequence of strings with one entry per sample (what ``default_collate`` makes of a string field) is split like
a tensor; other leaves (``None``, numbers, one string) are copied unchanged into every part.

**Under DDP** each rank splits its own batch. With Lightning's ``DistributedSampler`` rank ``r`` of ``R`` holds
the samples at global positions ``R·l + r`` of the union batch, so its contiguous part ``j`` (local positions
``[jB/k, (j+1)B/k)``) holds the global positions ``[jRB/k, (j+1)RB/k)``: the union of the ranks' parts ``j`` is
part ``j`` of the one-process batch, and the parts' statistics reduced over ranks equal the single-process ones
(exact when ``k`` divides the per-rank batch size ``B``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["batch_length", "part_sizes", "split_batch"]


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _is_string_column(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) for v in value)


def _lengths(batch: Any, path: str, found: list[tuple[str, int]]) -> None:
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise ValueError(
                f"Cannot split the batch into parts: {path} is a 0-d tensor ({batch.item()!r}) with no sample "
                "dimension. Give it a leading batch dimension, or use a strategy that does not split batches."
            )
        found.append((path, batch.shape[0]))
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            _lengths(value, f"{path}[{key!r}]", found)
    elif _is_string_column(batch):
        found.append((path, len(batch)))
    elif isinstance(batch, (list, tuple)):
        for i, value in enumerate(batch):
            _lengths(value, f"{path}[{i}]", found)


def batch_length(batch: Any) -> int:
    """The number of samples of ``batch``: the common size of dim 0 of its tensors (a clear error when they
    differ or when it holds no tensor)."""
    found: list[tuple[str, int]] = []
    _lengths(batch, "batch", found)
    if not found:
        raise ValueError(
            f"Cannot split the batch into parts: it holds no tensor (got {type(batch).__name__}). The batch must "
            "be a tensor or a (nested) dict/list/tuple of tensors with the samples along dim 0."
        )
    sizes = {n for _, n in found}
    if len(sizes) > 1:
        shown = ", ".join(f"{p}: {n}" for p, n in found)
        raise ValueError(
            f"Cannot split the batch into parts: its tensors have different sizes along dim 0 ({shown}). Every "
            "tensor must hold the same samples along dim 0; put per-batch constants outside the batch."
        )
    return found[0][1]


def _split(batch: Any, k: int) -> list[Any]:
    if isinstance(batch, Tensor):
        return list(torch.tensor_split(batch, k, dim=0))
    if isinstance(batch, Mapping):
        columns = {key: _split(value, k) for key, value in batch.items()}
        return [type(batch)({key: parts[j] for key, parts in columns.items()}) for j in range(k)]  # type: ignore[call-arg]
    if _is_string_column(batch):
        # the same boundaries as torch.tensor_split: sizes differ by at most one, the larger parts first
        sizes = [len(batch) // k + (1 if j < len(batch) % k else 0) for j in range(k)]
        bounds = [sum(sizes[:j]) for j in range(k + 1)]
        return [type(batch)(batch[bounds[j] : bounds[j + 1]]) for j in range(k)]
    if isinstance(batch, (list, tuple)):
        columns = [_split(value, k) for value in batch]
        if _is_namedtuple(batch):
            return [type(batch)(*(c[j] for c in columns)) for j in range(k)]
        return [type(batch)(c[j] for c in columns) for j in range(k)]
    return [batch] * k


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` split along dim 0 into ``parts`` disjoint contiguous parts (sizes differ by at most one).

    Raises ``ValueError`` naming the offending entry when the batch has no tensor, tensors of different lengths,
    a 0-d tensor, or fewer samples than ``parts``.
    """
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be an int >= 1, got {parts!r}.")
    n = batch_length(batch)
    if n < parts:
        raise ValueError(
            f"Cannot split a batch of {n} sample(s) into {parts} disjoint parts: each part needs at least one "
            f"sample. Use a batch size of at least {parts} (a multiple of {parts} keeps the parts equal and the "
            "DDP result exact), or drop_last=True so that a short last batch is not drawn."
        )
    return _split(batch, parts)


def part_sizes(batch: Any, parts: int) -> list[int]:
    """The sizes of :func:`split_batch`'s parts."""
    n = batch_length(batch)
    return [n // parts + (1 if j < n % parts else 0) for j in range(parts)]
