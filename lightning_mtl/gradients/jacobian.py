"""The Jacobian of the task losses: one batched backward (``vmap`` over the ``T`` rows), or a loop of ``T``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

#: ``"lean"`` is :class:`~lightning_mtl.gradients.TaskGradients`' Gramian-only engine (:mod:`~lightning_mtl.gradients.lean`)
JacobianMethod = Literal["auto", "batched", "loop", "lean"]


def _batched_grad(
    outputs: Tensor,
    inputs: Sequence[Tensor],
    scale: float,
    batched: bool,
    rows: Sequence[Tensor] | None = None,
) -> list[Tensor | None]:
    T = outputs.shape[0]
    if batched:
        eye = torch.eye(T, device=outputs.device, dtype=outputs.dtype) * scale
        return list(
            torch.autograd.grad(
                outputs, inputs, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        )
    per_task: list[list[Tensor | None]] = []
    for i in range(T):
        if rows is not None:  # the task's own graph only
            seed = torch.full((), scale, device=outputs.device, dtype=rows[i].dtype)
            grads = torch.autograd.grad(
                rows[i], inputs, grad_outputs=seed, retain_graph=True, allow_unused=True
            )
        else:
            g = torch.zeros_like(outputs)
            g[i] = scale
            grads = torch.autograd.grad(outputs, inputs, grad_outputs=g, retain_graph=True, allow_unused=True)
        per_task.append(list(grads))
    out: list[Tensor | None] = []
    for j in range(len(inputs)):
        col = [r[j] for r in per_task]
        if all(c is None for c in col):
            out.append(None)
        else:
            out.append(torch.stack([torch.zeros_like(inputs[j]) if c is None else c for c in col]))
    return out


def jacobian(
    outputs: Tensor,
    inputs: Sequence[Tensor],
    *,
    batched: bool = True,
    scale: float | None = None,
    rows: Sequence[Tensor] | None = None,
) -> Tensor:
    """Jacobian ``[T, P]`` (float32 or wider) of ``outputs [T]`` w.r.t. ``inputs``, flattened and concatenated.

    One batched backward (``is_grads_batched=True``) when ``batched``, else ``T`` backward passes. The graph
    is retained (the caller back-propagates the combined loss afterwards). Inputs no output reaches get zero
    columns. ``rows`` (the scalars ``outputs`` stacks) lets the loop back-propagate each task's own graph only.
    ``scale`` (the AMP loss scale) multiplies the backward's seed and divides the result. No DDP hook fires
    (``torch.autograd.grad``): nothing is all-reduced behind the caller's back.
    """
    if outputs.ndim != 1:
        raise ValueError(f"jacobian expects a 1-d tensor of T losses, got shape {tuple(outputs.shape)}.")
    s = 1.0 if scale is None else float(scale)
    grads = _batched_grad(outputs, inputs, s, batched, rows)
    return _flatten_columns(grads, inputs, outputs, s)


#: from this many tasks on, a Jacobian whose tasks reach the shared parameters only through the marked
#: representation is computed in two phases (:func:`split_jacobian`)
SPLIT_MIN_TASKS = 8

SplitPlan = Literal["per_task", "batched"]


def split_plan(rows: Sequence[Tensor], through: Tensor, inputs: Sequence[Tensor]) -> SplitPlan | None:
    """Whether :func:`split_jacobian` is exact for these losses: every path from a loss to an input passes through
    ``through`` (the marked shared representation). Walks each loss's graph down to ``through`` (never below it).
    ``"per_task"`` when the losses' graphs above ``through`` are disjoint (separate heads: one backward per task
    costs only its own head), ``"batched"`` when they share nodes (e.g. one fused head), ``None`` when an input
    is reached another way (a skip connection around the representation, a shared layer after it), or
    ``through`` is not produced by an operation."""
    stop = through.grad_fn
    if stop is None:
        return None
    stop_nr = through.output_nr
    targets = {id(p) for p in inputs}
    owner: dict[Any, int] = {}
    shared = False
    for i, row in enumerate(rows):
        if row.grad_fn is None:
            return None
        pending, seen = [row.grad_fn], set()
        while pending:
            node = pending.pop()
            if node in seen:
                continue
            seen.add(node)
            if owner.setdefault(node, i) != i:
                shared = True
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
            if variable is not None and id(variable) in targets:
                return None
            for child, nr in node.next_functions:
                if child is None:
                    continue
                if child is stop:
                    if nr != stop_nr:  # another output of the op that makes the representation
                        return None
                    continue
                pending.append(child)
    return "batched" if shared else "per_task"


def split_jacobian(
    outputs: Tensor,
    rows: Sequence[Tensor],
    through: Tensor,
    inputs: Sequence[Tensor],
    plan: SplitPlan,
    *,
    scale: float | None = None,
) -> Tensor:
    """:func:`jacobian` of ``outputs`` (``torch.stack(rows)``) through the representation ``through`` that
    separates them from ``inputs`` (:func:`split_plan`): first the per-task gradients ``[T, *through.shape]``
    w.r.t. the representation (``"per_task"``: one backward of each task's own graph; ``"batched"``: one
    batched backward of the stack down to the representation), then one batched backward of those through the
    trunk to ``inputs``. Exact (the chain rule); with separate heads the heads are back-propagated once per task
    instead of ``T`` times each by the batched backward of the whole graph."""
    return split_jacobians([outputs], [rows], [through], inputs, plan, scale=scale)[0]


def split_jacobians(
    outputs: Sequence[Tensor],
    rows: Sequence[Sequence[Tensor]],
    throughs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    plan: SplitPlan,
    *,
    scale: float | None = None,
) -> Tensor:
    """:func:`split_jacobian` of ``k`` independent graphs at once (the disjoint batch parts of MoDo and SDMGrad):
    part ``p``'s losses ``outputs[p]`` reach ``inputs`` only through its own representation ``throughs[p]``
    (:func:`split_plan` of each part; then no part's losses reach another part's representation either, since
    that one leads to ``inputs`` too). The first phase then takes every part's gradients at its representation
    together: one backward per task (``"per_task"``) or one batched backward (``"batched"``) for all ``k``
    parts instead of one per part, since the gradient of ``Σₚ Lₜ⁽ᵖ⁾`` at ``throughs[p]`` is that of
    ``Lₜ⁽ᵖ⁾`` alone. The second phase is one batched backward per part through its trunk. Returns ``[k, T, P]``."""
    s = 1.0 if scale is None else float(scale)
    T = outputs[0].shape[0]
    if plan == "per_task":
        per_task = [
            torch.autograd.grad(
                [r[t] for r in rows],
                list(throughs),
                grad_outputs=[torch.full((), s, device=r[t].device, dtype=r[t].dtype) for r in rows],
                retain_graph=True,
                allow_unused=True,
            )
            for t in range(T)
        ]
        at_reps: list[Tensor | None] = [
            None
            if all(g[p] is None for g in per_task)
            else torch.stack([torch.zeros_like(z) if g[p] is None else g[p] for g in per_task])
            for p, z in enumerate(throughs)
        ]
    else:
        at_reps = list(
            torch.autograd.grad(
                list(outputs),
                list(throughs),
                grad_outputs=[torch.eye(T, device=L.device, dtype=L.dtype) * s for L in outputs],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        )
    out: Tensor | None = None
    for p, (L, z, at_rep) in enumerate(zip(outputs, throughs, at_reps, strict=True)):  # [T, *z.shape], scaled
        if at_rep is None:
            at_rep = torch.zeros((T, *z.shape), device=z.device, dtype=z.dtype)
        grads = torch.autograd.grad(
            z, inputs, grad_outputs=at_rep, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        if out is None:  # [k, T, P]: each part's columns written in place (no stack of the parts)
            P = sum(x.numel() for x in inputs)
            dtype = torch.promote_types(L.dtype, torch.float32)
            out = torch.empty((len(outputs), T, P), device=L.device, dtype=dtype)
        _flatten_columns(list(grads), inputs, L, s, out=out[p])
    assert out is not None
    return out


def _flatten_columns(
    grads: list[Tensor | None], inputs: Sequence[Tensor], outputs: Tensor, s: float, out: Tensor | None = None
) -> Tensor:
    """``[T, P]``: each input's per-task gradients flattened (zeros where unreached), concatenated, unscaled;
    written into ``out`` when given."""
    T = outputs.shape[0]
    dtype = torch.promote_types(outputs.dtype, torch.float32) if out is None else out.dtype
    if out is not None:
        offset = 0
        for g, x in zip(grads, inputs):
            n = x.numel()
            column = out[:, offset : offset + n]
            if g is None:
                column.zero_()
            else:  # in out's dtype first, then unscaled, as the path below
                column.copy_(g.reshape(T, n))
                if s != 1.0:
                    column.div_(s)
            offset += n
        return out
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

    def __call__(
        self,
        outputs: Tensor,
        inputs: Sequence[Tensor],
        scale: float | None = None,
        *,
        rows: Sequence[Tensor] | None = None,
        through: Tensor | None = None,
    ) -> Tensor:
        """The Jacobian of ``outputs`` w.r.t. ``inputs``. Given the losses before their stack (``rows``) and the
        marked shared representation (``through``), with at least :data:`SPLIT_MIN_TASKS` tasks, and when every
        path from a loss to an input passes through the representation (:func:`split_plan`), it is computed
        through the representation (:func:`split_jacobian`: the same Jacobian, without back-propagating every
        head ``T`` times)."""
        return self.parts([outputs], inputs, scale, rows=[rows], throughs=[through])[0]

    def parts(
        self,
        outputs: Sequence[Tensor],
        inputs: Sequence[Tensor],
        scale: float | None = None,
        *,
        rows: Sequence[Sequence[Tensor] | None] | None = None,
        throughs: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        """The Jacobians ``[k, T, P]`` of ``k`` independent graphs' losses (the disjoint batch parts of MoDo and
        SDMGrad), as :meth:`__call__` of each; through the parts' representations together
        (:func:`split_jacobians`) where every part can be split."""
        k = len(outputs)
        rows_of = list(rows) if rows is not None else [None] * k
        zs = list(throughs) if throughs is not None else [None] * k
        split = self._split(outputs, inputs, scale, rows_of, zs)
        if split is not None:
            return split
        if k == 1:
            return self._whole(outputs[0], inputs, scale, rows_of[0]).unsqueeze(0)
        return torch.stack([self._whole(L, inputs, scale, r) for L, r in zip(outputs, rows_of, strict=True)])

    def _split(
        self,
        outputs: Sequence[Tensor],
        inputs: Sequence[Tensor],
        scale: float | None,
        rows: list[Sequence[Tensor] | None],
        throughs: list[Tensor | None],
    ) -> Tensor | None:
        if not self.batched or any(r is None or len(r) < SPLIT_MIN_TASKS for r in rows):
            return None
        if any(z is None for z in throughs) or len({id(z) for z in throughs}) < len(throughs):
            return None
        plans = [split_plan(r, z, inputs) for r, z in zip(rows, throughs)]  # type: ignore[arg-type]
        if None in plans:
            return None
        plan: SplitPlan = "per_task" if all(p == "per_task" for p in plans) else "batched"
        # a RuntimeError (e.g. an operation without a vmap rule): the plain batched backward and its fallback
        try:
            return split_jacobians(outputs, rows, throughs, inputs, plan, scale=scale)  # type: ignore[arg-type]
        except RuntimeError:
            return None

    def _whole(
        self, outputs: Tensor, inputs: Sequence[Tensor], scale: float | None, rows: Sequence[Tensor] | None
    ) -> Tensor:
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
                    stacklevel=4,
                )
                self.batched = False
        return jacobian(outputs, inputs, batched=False, scale=scale, rows=rows)


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
