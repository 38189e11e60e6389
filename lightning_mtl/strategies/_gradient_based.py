"""The gradient-based strategies' base: weights from the per-task gradients' Gramian, then one backward.

Long because the base owns everything a weighting method inherits: update_every, sync, state by task name, clipping,
warnings and the narrowing to the present tasks of partial labels.

The engine work — per-task gradients, the accumulation window, the cross-rank reduction, the heads
correction and the combined backward — belongs to :class:`~lightning_mtl.gradients.TaskGradients`. A
:class:`GradientWeighting` strategy asks it once per window for the statistic of the global batch (the
Gramian ``G = J Jᵀ``, float64, or the Jacobian ``J``), turns it into weights with its method's math
(:mod:`lightning_mtl.functional`) and its own state, and hands the weights back for the one backward:

``module → strategy → engine (per-task gradients, window, reduction) → functional (weights) → engine (one
backward) → module``.

Under DDP with ``sync="exact"`` (default) every rank holds the statistic of the global batch, so the weights
are identical everywhere (random methods draw from a generator seeded identically on every rank) and the
update equals the single-process update on the union batch. ``sync="local"`` skips the ``T × P`` reduction:
each rank's weights come from its own batch and DDP averages the resulting updates (an approximation); the
logged weights and the method's state are then averaged over ranks.

``update_every=k`` recomputes the weights every ``k`` optimizer steps and reuses them in between. With
``heads="weighted"`` those steps take no per-task gradients at all (the cost of equal weighting); with
``heads="plain"`` they still take this rank's per-task gradients (to split the shared and the head gradients)
but skip the reduction and the method's solver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_mtl.functional import cosine_min
from lightning_mtl.gradients import (
    Heads,
    JacobianMethod,
    SyncMode,
    TaskGradients,
    nan_weights,
    shared_parameters_of,
)
from lightning_mtl.step import StepContext, reduce_mean
from lightning_mtl.strategies._random import SeededGenerator
from lightning_mtl.strategies.base import MTLStrategy

GradientMode = Literal["parameters", "representation"]
_R = TypeVar("_R")

__all__ = ["GradientMode", "GradientWeighting", "JacobianMethod", "SyncMode"]


class GradientWeighting(MTLStrategy):
    """Base of the strategies whose update is ``Σ wᵢ∇Lᵢ`` with weights computed from per-task gradients.

    Subclasses implement :meth:`compute_weights` (a call into :mod:`lightning_mtl.functional`) and, when
    they carry state between steps, :meth:`method_state` / :meth:`load_method_state` / :meth:`method_config`;
    they set :attr:`heads` to ``"plain"`` when the task-specific parameters keep their own gradient ``∇ΣLᵢ``
    (the method's combination then applies to the shared parameters, or upstream of the marked
    representation, only) instead of ``wᵢ∇Lᵢ`` (``"weighted"``, the default).

    Args:
        mode: ``"parameters"`` (Jacobian w.r.t. ``shared_parameters()``) or ``"representation"`` (gradients
            w.r.t. the tensor marked by ``self.shared_representation(z)`` in ``task_losses``; only for methods
            computed on the Gramian).
        update_every: recompute the weights every ``k`` optimizer steps and reuse them in between (as
            Nash-MTL-T); ``1`` (default) recomputes them every step.
        sync: ``"exact"`` (default; the DDP update equals the single-process update on the global batch) or
            ``"local"`` (weights per rank, results averaged; an approximation that saves the
            ``T × P`` all-reduce).
        jacobian: ``"auto"`` (one batched backward, per-task loop if the graph does not support ``vmap``;
            the lean engine instead for a Gramian-only method when ``T·P·4`` bytes exceed 1 GiB, or 256 MiB and
            a quarter of the free memory), ``"batched"``, ``"loop"`` or ``"lean"`` (``needs == "gramian"``
            only: the Gramian block by block, never the full ``T × P`` Jacobian; see
            :mod:`lightning_mtl.gradients.lean`).
        seed: seed of the generator of random methods (``None``: Lightning's global seed, else 0).
    """

    #: what :meth:`compute_weights` receives: the Gramian ``[T, T]`` (float64) or the Jacobian ``[T, P]``
    needs: Literal["gramian", "jacobian"] = "gramian"
    #: whether the method draws random numbers (from a generator seeded identically on every rank)
    random: bool = False
    #: gradient of the task-specific parameters: ``"weighted"`` (``wᵢ∇Lᵢ``) or ``"plain"`` (``∇ΣLᵢ``)
    heads: Heads = "weighted"
    #: clip the total norm of the shared parameters' gradient to this value before each optimizer step
    max_norm: float | None = None
    #: partial labels: the weights of a step with absent tasks are computed on the present tasks' rows only
    #: (absent ones get 0), with the method's per-task state narrowed to them and written back
    #: (:meth:`method_task_dims`, :meth:`method_absent_fill`, :meth:`merge_present_state`); a stateful method
    #: without declared task dimensions sets it to ``False``
    supports_absent_tasks = True

    def __init__(
        self,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if mode == "representation" and self.needs != "gramian":
            raise ValueError(
                f"{name} does not support mode='representation': it needs the full Jacobian of the shared "
                "parameters, not only their Gramian. Use mode='parameters'."
            )
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"{name} update_every must be an int >= 1, got {update_every!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{name} seed must be an int or None, got {seed!r}.")
        self._gradients = TaskGradients(  # validates sync and jacobian ('lean' only when needs == "gramian")
            name, target=mode, sync=sync, jacobian=jacobian, gramian_only=self.needs == "gramian"
        )
        self.mode = mode
        self.update_every = update_every
        self.sync = sync
        self.seed = seed
        self._reset()

    def _reset(self) -> None:
        self._window_present: list[bool] | None = None
        self._present_index: list[int] | None = None
        self._narrow = False
        self._weights: Tensor | None = None
        self._since_update = 0
        self._random = SeededGenerator(self.seed)
        self._metrics: dict[str, Tensor] = {}
        self._computing = True
        self._clip_pending = False
        self._warned_unreached: set[str] = set()
        self._gradients.reset()

    # ------------------------------------------------------------------ subclass API
    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        """Weights ``[T]`` from the Gramian ``[T, T]`` (float64; or the Jacobian ``[T, P]`` when
        ``needs == "jacobian"``) of the global batch, and the batch's losses ``[T]`` (averaged over ranks)."""
        raise NotImplementedError

    def head_weights(self) -> Tensor | None:
        """Weights ``[T]`` of the task-specific parameters' gradient ``Σ hᵢ∇Lᵢ`` when they differ from both
        ``wᵢ`` and 1 (IMTL: the scaled losses' ``e^{sᵢ}``); ``None`` (default) follows :attr:`heads`."""
        return None

    def method_state(self) -> dict[str, Any]:
        """State the method carries between steps (tensors and primitives, identical on every rank)."""
        return {}

    def load_method_state(self, state: Mapping[str, Any], order: Sequence[int] | None = None) -> None:
        """Restore :meth:`method_state`; ``order[i]`` is the saved index of task ``i`` (``None``: same order).
        Called with ``({}, None)`` to reset."""

    def method_config(self) -> dict[str, Any]:
        """Hyper-parameters that give :meth:`method_state` its meaning (checked on restore)."""
        return {}

    def method_task_dims(self) -> dict[str, tuple[int, ...]]:
        """The task dimensions of each tensor of :meth:`method_state` (e.g. ``{"alpha": (0,)}``, ``(0, 1)`` for
        a ``T × T`` matrix): how a step with absent tasks narrows the state to the present tasks and writes the
        result back. Entries without task dimensions (counters) take the narrowed step's value."""
        return {}

    def method_absent_fill(self) -> dict[str, float]:
        """The initial value of each task-dimensioned tensor of :meth:`method_state` (e.g. ``{"targets": 0.0}``):
        when a step with absent tasks finds no state yet (``None``: the method's first update), the narrowed
        result is written into a full-size tensor holding this value for the absent tasks, so that the present
        tasks' first update is kept. A key not listed stays ``None`` until an update with every task."""
        return {}

    def merge_present_state(
        self, full: Mapping[str, Any], narrowed: Mapping[str, Any], present: list[int]
    ) -> dict[str, Any]:
        """The full method state after a step on the present tasks only: ``full`` with the present tasks'
        entries replaced by ``narrowed``'s along :meth:`method_task_dims` (fresh tensors filled by
        :meth:`method_absent_fill` where ``full`` has none). Override for a state with a constraint across
        tasks (ExcessMTL's ``Σ w = T``)."""
        return _write_back(
            dict(full),
            dict(narrowed),
            self.method_task_dims(),
            present,
            fill=self.method_absent_fill(),
            num_tasks=self.num_tasks,
        )

    @property
    def present_index(self) -> list[int] | None:
        """While :meth:`compute_weights` runs on the present tasks only (partial labels): their indices in
        task order (for per-task inputs that are not method state, e.g. IMTL's scales); ``None`` otherwise."""
        return self._present_index

    @property
    def generator(self) -> torch.Generator:
        """CPU generator seeded with ``seed`` (default: the global seed), identical on every rank."""
        return self._random.get()

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if (
            stage == "fit"
            and self.mode == "parameters"
            and not getattr(pl_module, "finds_shared_parameters", False)
        ):
            shared_parameters_of(pl_module, type(self).__name__)  # fail before training if none declared
        if self.random:
            _ = self.generator

    def reset_state(self) -> None:
        super().reset_state()
        self._reset()
        self.load_method_state({}, None)

    # ------------------------------------------------------------------ the step
    def backward(self, ctx: StepContext) -> None:
        gradients = self._gradients
        if ctx.is_window_start:
            gradients.reset()
            self._computing = self._weights is None or self._since_update >= self.update_every or self._narrow
        if not self._computing:
            assert self._weights is not None
            gradients.backward_reusing(ctx, self._weights, self.heads, self.head_weights())
            self._clip_pending = ctx.is_sync_step
            return
        gradients.add(ctx)
        # partial labels: a task is present in the window when one of its micro-batches labels it
        self._window_present = _window_presence(self._window_present, ctx.present, ctx.is_window_start)
        if not ctx.is_sync_step:
            return
        stat = gradients.gramian(ctx) if self.needs == "gramian" else gradients.jacobian(ctx)
        if gradients.check_finite(ctx, stat):
            weights = self._update(ctx, stat, gradients.losses)
        else:  # AMP overflow: the GradScaler skips this step; weights and state stay as they were
            weights = nan_weights(self.num_tasks, ctx.losses.device)
        gradients.backward(ctx, weights, self.heads, self.head_weights())
        self._clip_pending = True

    def _update(self, ctx: StepContext, stat: Tensor, losses: Tensor) -> Tensor:
        present, self._window_present = self._window_present, None
        # weights computed without some tasks are not reused (update_every): the next window recomputes them
        self._narrow = present is not None and not all(present)
        if not self._narrow:
            weights = self.compute_weights(stat, losses)
        else:
            weights = self._present_weights(stat, losses, [i for i, ok in enumerate(present) if ok])
        weights = weights.detach().to(device=ctx.losses.device, dtype=torch.float32)
        G = stat if self.needs == "gramian" else None
        if G is not None:
            self._metrics["train/grad/cos_min"] = cosine_min(G).float()
        self._warn_unreached(stat, weights, present)
        if self.sync == "local" and ctx.world_size > 1:
            self._weights = reduce_mean(ctx.trainer, weights)
            self._average_method_state(ctx)
        else:
            self._weights = weights
        self._since_update = 0
        return weights

    def _present_weights(self, stat: Tensor, losses: Tensor, present: list[int]) -> Tensor:
        """:meth:`compute_weights` on the present tasks only (partial labels): the method sees a problem of
        ``len(present)`` tasks (their Gramian block or Jacobian rows, their losses, their state); the absent
        tasks get weight 0 and keep their state."""
        index = torch.tensor(present, device=stat.device)
        sub = stat[index][:, index] if self.needs == "gramian" else stat[index]
        sub_losses = losses[index.to(losses.device)]
        sub_weights = self._on_present_tasks(present, lambda: self.compute_weights(sub, sub_losses))
        weights = sub_weights.new_zeros(self.num_tasks)
        weights[index.to(weights.device)] = sub_weights
        return weights

    def _on_present_tasks(self, present: list[int], compute: Callable[[], _R]) -> _R:
        """Run ``compute`` as if the problem had only the ``present`` tasks (partial labels): task names,
        :attr:`present_index` and the method's state are narrowed to them (each tensor along its
        :meth:`method_task_dims`, then ``load_method_state(narrowed, None)``), and afterwards the state is merged
        back (:meth:`merge_present_state`), so that the absent tasks' entries stay as they were. On an error the
        full state is restored."""
        full_state = dict(self.method_state())
        names, tasks = self._task_names, self._tasks
        assert names is not None
        try:
            self._task_names = tuple(names[i] for i in present)
            self._tasks = None if tasks is None else tuple(tasks[i] for i in present)
            self._present_index = list(present)
            if full_state:
                self.load_method_state(_narrow(full_state, self.method_task_dims(), present), None)
            result = compute()
            narrowed = dict(self.method_state())
        except BaseException:
            self._task_names, self._tasks, self._present_index = names, tasks, None
            self.load_method_state(full_state, None) if full_state else None
            raise
        finally:
            self._task_names, self._tasks, self._present_index = names, tasks, None
        if full_state:
            self.load_method_state(self.merge_present_state(full_state, narrowed, present), None)
        return result

    def _warn_unreached(self, stat: Tensor, weights: Tensor, present: Sequence[bool] | None = None) -> None:
        """Warn once per task whose loss does not reach the shared parameters (a zero gradient row); an absent
        task (partial labels: ``present[i]`` false) has a zero row because it has no loss, not a warning."""
        squared = stat.diagonal() if self.needs == "gramian" else (stat * stat).sum(dim=1)
        zero = (squared == 0).tolist()
        if present is not None:
            zero = [z and ok for z, ok in zip(zero, present)]
        if not any(zero) or all(zero):
            return
        shown = {n: round(w, 4) for n, w in zip(self.task_names, weights.tolist())}
        what = "shared parameters" if self.mode == "parameters" else "marked shared representation"
        for name, is_zero in zip(self.task_names, zero):
            if is_zero and name not in self._warned_unreached:
                self._warned_unreached.add(name)
                rank_zero_warn(
                    f"{type(self).__name__}: task {name!r} has a zero gradient on the {what}: its loss does not "
                    f"reach them, so the method cannot balance it against the other tasks (this step's weights: "
                    f"{shown}). Feed its head from the shared encoder, or leave the parameters it does not use "
                    "out of shared_parameters(). (Warned once per task and fit.)",
                    category=RuntimeWarning,
                )

    def _average_method_state(self, ctx: StepContext) -> None:
        """``sync="local"``: average the floating-point tensors of the method's state over ranks."""
        state = dict(self.method_state())
        changed = False
        for key, value in state.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                state[key] = reduce_mean(ctx.trainer, value.to(ctx.losses.device)).to(value.device)
                changed = True
        if changed:
            self.load_method_state(state, None)

    def on_optimizer_step(self, module: pl.LightningModule, skipped: bool) -> None:
        self._since_update += 1
        self._clip_pending = False

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # shared-gradient clipping (Nash-MTL, FairGrad). Lightning calls this hook after the AMP scaler
        # unscaled the gradients (and after DDP averaged them).
        if self.max_norm is None or not self._clip_pending:
            return
        self._clip_pending = False
        params = shared_parameters_of(pl_module, type(self).__name__)
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.max_norm)

    def on_accumulation_window_discarded(self, module: pl.LightningModule) -> None:
        self._gradients.reset()

    # ------------------------------------------------------------------ what gets logged / saved
    def weights_tensor(self) -> Tensor | None:
        return self._weights

    def extra_metrics(self) -> dict[str, Tensor]:
        return dict(self._metrics)

    def state_config(self) -> dict[str, Any]:
        return {"mode": self.mode, **self.method_config()}

    def task_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "weights": None if self._weights is None else self._weights.detach().cpu().clone(),
            "since_update": self._since_update,
            "method": dict(self.method_state()),
        }
        state.update(self._random.state())
        return state

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        from lightning_mtl.task_state import take_tasks

        weights = state.get("weights")
        self._weights = None if weights is None else take_tasks(weights, order).clone()
        self._since_update = int(state.get("since_update", 0))
        self._random.load(state)
        self.load_method_state(state.get("method", {}), order)


def _window_presence(window: list[bool] | None, present: list[bool] | None, start: bool) -> list[bool] | None:
    """Which tasks an accumulation window labels so far (``None``: every task), after one more micro-batch."""
    if start:
        return None if present is None else list(present)
    if window is None or present is None:
        return None
    return [a or b for a, b in zip(window, present)]


def _narrow(
    full: Mapping[str, Any], dims: Mapping[str, tuple[int, ...]], present: list[int]
) -> dict[str, Any]:
    """``full`` with each tensor's task ``dims`` restricted to the ``present`` tasks (in their order)."""
    narrowed = dict(full)
    for key, task_dims in dims.items():
        value = full.get(key)
        if isinstance(value, Tensor) and task_dims:
            index = torch.tensor(present, dtype=torch.long, device=value.device)
            for d in task_dims:
                value = value.index_select(d, index)
            narrowed[key] = value
    return narrowed


def _write_back(
    full: dict[str, Any],
    narrowed: dict[str, Any],
    dims: Mapping[str, tuple[int, ...]],
    present: list[int],
    *,
    fill: Mapping[str, float] | None = None,
    num_tasks: int | None = None,
) -> dict[str, Any]:
    """``full`` with the present tasks' entries replaced by ``narrowed``'s (along each key's task ``dims``).
    A key whose full value does not exist yet (``None``) gets a fresh full-size tensor of ``fill[key]`` for the
    absent tasks when ``fill`` names it (and ``num_tasks`` is given); otherwise it stays ``None``."""
    merged = dict(full)
    for key, value in narrowed.items():
        task_dims = dims.get(key, ())
        old = full.get(key)
        if not task_dims:
            merged[key] = value  # no task dimension (a counter): the narrowed step's value
            continue
        if isinstance(value, Tensor) and old is None and fill and key in fill and num_tasks is not None:
            shape = list(value.shape)
            for d in task_dims:
                shape[d] = num_tasks
            old = torch.full(shape, float(fill[key]), dtype=value.dtype, device=value.device)
        if not isinstance(value, Tensor) or not isinstance(old, Tensor):
            continue  # no full-size value to write into (e.g. no state yet): the absent tasks' stays as it was

        out = old.clone()
        index = torch.tensor(present, device=out.device)
        grid = torch.meshgrid(*([index] * len(task_dims)), indexing="ij")
        selector: list[Any] = [slice(None)] * out.dim()
        for d, g in zip(task_dims, grid):
            selector[d] = g
        out[tuple(selector)] = value.to(out)
        merged[key] = out
    return merged


def on_present_simplex(weights: Tensor) -> Tensor:
    """A simplex state's entries narrowed to the present tasks (partial labels), rescaled onto their own simplex
    (uniform when they held none of it): what a method whose state ``λ ∈ Δ`` steps on (MoCo, MoDo, SDMGrad)."""
    share = float(weights.sum())
    return weights / share if share > 0 else torch.full_like(weights, 1.0 / weights.numel())


def merge_simplex(before: Tensor | None, new: Tensor, present: list[int], num_tasks: int) -> Tensor:
    """A full simplex state after a step on the present tasks: their new entries (on their own simplex) scaled
    by the share of the full simplex they held ``before`` (uniform ``1/T`` when ``None``: no state yet), so that
    the state still sums to 1 and the absent tasks' entries stay as they were. float64, on the CPU."""
    old = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
    if before is not None:
        old = before.detach().to(device="cpu", dtype=torch.float64)
    index = torch.tensor(present, dtype=torch.long)
    out = old.clone()
    # (present tasks with no share keep none: the absent tasks hold all of it)
    out[index] = new.detach().to(device="cpu", dtype=torch.float64) * float(old[index].sum())
    return out
