"""One DataLoader per task, combined into one training loader that yields ``{task: batch}`` dicts.

Long because the draw, the per-task cycling, the DDP sharding, the epoch and resume state and their checks are one
iterator's state, and Lightning's loader protocol needs all of it in one object.

:class:`MultiTaskLoader` is what a ``train_dataloader`` returns when every task has its own dataset (sizes may
differ): ``mode="joint"`` gives every task each step (shorter loaders are cycled), ``mode="sampled"`` draws
``tasks_per_step`` tasks each step with probabilities ``p_i ∝ w_i^{1/τ}``. The draw is seeded, the same on every DDP
rank, and resumable from a Lightning checkpoint (``state_dict`` / ``load_state_dict``, which Lightning's fit loop
saves with the loop state). Each task's loader is sharded with its own ``DistributedSampler`` under DDP.

:func:`task_eval_loaders` turns one evaluation loader per task into Lightning's several eval dataloaders, whose
batches are keyed by task too.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

__all__ = ["MultiTaskLoader", "task_eval_loaders"]

_MODES = ("joint", "sampled")
_STATE_VERSION = 1


class _PassSampler(Sampler):
    """Wraps a loader's index source (its batch sampler, or its sampler without automatic batching). Before each
    pass the loader sets ``pass_index`` (the seeded sampler's epoch: a fresh permutation per pass) and ``skip``
    (indices to drop at the start of the pass, to resume mid-pass without loading the skipped samples)."""

    def __init__(self, inner: Any, seeded: DistributedSampler) -> None:
        self.inner = inner
        self.seeded = seeded
        self.pass_index = 0
        self.skip = 0

    def __iter__(self) -> Iterator[Any]:
        # not reset here: a DataLoader with workers calls iter() twice when it starts; every pass sets both
        self.seeded.set_epoch(self.pass_index)
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner)


class _Prepared:
    """A task's loader as iterated on this rank: the rebuilt loader (``pass_sampler`` set) or the user's own."""

    def __init__(
        self,
        loader: DataLoader,
        pass_sampler: _PassSampler | None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.loader = loader
        self.pass_sampler = pass_sampler
        self.generator = generator  # the rebuilt loader's own (worker base seeds), reseeded every pass
        self.length = len(loader)

    def open(self, key: int, skip: int) -> Iterator[Any]:
        """An iterator over the pass whose seed is ``key``, from batch ``skip`` on."""
        if self.pass_sampler is not None:
            self.pass_sampler.pass_index = key
            self.pass_sampler.skip = skip
            if self.generator is not None:
                self.generator.manual_seed(key)
            return iter(self.loader)
        _set_epoch(self.loader, key)
        iterator = iter(self.loader)
        for _ in range(skip):  # a loader used as given: skipping means loading the skipped batches
            next(iterator)
        return iterator


class MultiTaskLoader:
    """Combine one :class:`~torch.utils.data.DataLoader` per task into a training loader that yields
    ``{task: batch}`` dicts (tasks in the order of ``loaders``), for ``Trainer.fit``.

    Args:
        loaders: ``{task: DataLoader}``, map-style datasets of any sizes (at least one batch each).
        mode: ``"joint"``: every task in every step; shorter loaders are cycled (a new pass, reshuffled, starts
            when one ends); an epoch is the longest loader. ``"sampled"``: ``tasks_per_step`` tasks per step,
            drawn without replacement with probabilities ``p_i ∝ w_i^{1/τ}``; tasks not drawn are absent from the
            dict (declare them ``Task(name, partial=True)`` in the module).
        tasks_per_step: tasks per step in ``"sampled"`` mode, ``1 <= k <= T``. With ``k > 1`` the ``k`` tasks are
            drawn one after another without replacement (``torch.multinomial``): the first draw follows ``p``, and
            how often a task is included is flatter than ``p``.
        weights: ``"uniform"`` (``w_i = 1``), ``"proportional"`` (``w_i = n_i``, the task's dataset size: the
            number of samples, over all ranks) or ``{task: w_i}`` with a positive ``w_i`` for every task.
        temperature: ``τ > 0`` (``math.inf`` allowed). The weights are raised to ``1/τ`` whatever their source:
            with ``"proportional"``, ``τ = 1`` samples in proportion to the dataset sizes and ``τ → ∞`` tends to
            uniform (the temperature sampling of multilingual and GLUE-style MTL); explicit weights are used as
            given with the default ``τ = 1``.
        seed: seeds the task draw and each task's shuffling. Default: Lightning's global seed
            (``os.environ["PL_GLOBAL_SEED"]``, set by ``seed_everything``) when the first epoch starts, else 0.
        steps_per_epoch: the epoch length in steps. Default: the longest loader (``"joint"``); the number of
            steps that draws as many batches as one pass over every loader, ``ceil(Σ_i len(loader_i) / k)``
            (``"sampled"``; with ``weights="proportional"``, ``τ = 1`` and ``k = 1`` each task then gets about one
            pass per epoch). Lengths are per rank (after sharding).
        use_distributed_sampler: rebuild each plain loader over a seeded sampler (below). ``False``: the loaders
            are iterated as given (no sharding under DDP; set ``Trainer(use_distributed_sampler=False)`` too).

    **Epochs.** Each epoch starts afresh: the draws of epoch ``e`` come from a generator seeded from
    ``(seed, e)`` and every task starts a new pass at the epoch's start (as Lightning's ``CombinedLoader`` restarts
    its loaders), so an epoch's sequence is a function of ``(seed, e)`` alone. ``e`` is the Trainer's epoch:
    Lightning's fit loop calls ``set_epoch`` on each train loader's ``sampler`` at every epoch start, and this
    loader's :attr:`sampler` passes it on (:meth:`set_epoch`); used without Lightning, each new iteration is the
    next epoch.

    **Sampling within a task.** Each loader whose sampler is the default one (``shuffle=True`` or ``False``) is
    rebuilt (same dataset, batch size, ``drop_last``, ``collate_fn``, workers) over a
    ``DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=<the loader's shuffle>)``, with one
    process too. Before every pass over a task (each cycle), ``set_epoch`` receives a number derived from
    ``(seed, task, epoch, pass)``: each pass is a new permutation, reproducible from ``seed`` alone and different
    between tasks (the loader's own ``generator`` is not used for it), and the ranks see disjoint shards of it
    (padded to equal length, as with Lightning's sampler). The rebuilt loader gets its own generator, reseeded
    every pass, for its workers' base seed: iterating never touches the global RNG. Loaders with another
    sampler or batch sampler, or a ``DataLoader`` subclass, are used as given (``set_epoch`` is called on a
    sampler that has it); under DDP they must shard themselves (a ``DistributedSampler``) or an error is raised.
    Lightning only injects samplers into the loaders it sees, which here is none: this loader does the sharding.

    **Determinism and resume.** The draw uses its own ``torch.Generator`` (never the global RNG), seeded
    identically on every rank, so every rank draws the same tasks each step. :meth:`state_dict` holds the
    generator's state, the epoch, the position within it, and each task's pass and position within the pass
    (tensors and primitives). Lightning's fit loop saves it in every checkpoint
    (``loops.fit_loop.state_dict.combined_loader``) and, on a resume mid-epoch, loads it before the loader is
    iterated: the run continues the same sequence of draws and batches (the skipped batches of a rebuilt loader
    are skipped as indices, not loaded). On a resume from an epoch-end checkpoint Lightning does not load loader
    states; the next epoch then starts from ``(seed, epoch)`` as it would have. Resume with the same number of
    processes (positions are per-rank batch counts) and the same loaders and arguments (checked).

    Not supported: iterable-style datasets (no length, no sampler to shard or resume).
    """

    def __init__(
        self,
        loaders: Mapping[str, DataLoader],
        mode: str = "joint",
        tasks_per_step: int = 1,
        weights: str | Mapping[str, float] = "uniform",
        temperature: float = 1.0,
        seed: int | None = None,
        steps_per_epoch: int | None = None,
        use_distributed_sampler: bool = True,
    ) -> None:
        self.loaders: dict[str, DataLoader] = _check_loaders(loaders)
        self.tasks: list[str] = list(self.loaders)
        if mode not in _MODES:
            raise ValueError(f"MultiTaskLoader: mode must be 'joint' or 'sampled', got {mode!r}.")
        self.mode = mode
        if mode == "joint":
            unused = [
                f"{name}={value!r}"
                for name, value, default in (
                    ("tasks_per_step", tasks_per_step, 1),
                    ("weights", weights, "uniform"),
                    ("temperature", temperature, 1.0),
                )
                if not (isinstance(value, type(default)) and value == default)
            ]
            if unused:
                raise ValueError(
                    f"MultiTaskLoader: {', '.join(unused)} only apply to mode='sampled' (mode='joint' gives every "
                    "task every step). Drop them, or use mode='sampled'."
                )
        if isinstance(tasks_per_step, bool) or not isinstance(tasks_per_step, int):
            raise ValueError(f"MultiTaskLoader: tasks_per_step must be an int, got {tasks_per_step!r}.")
        if not 1 <= tasks_per_step <= len(self.tasks):
            raise ValueError(
                f"MultiTaskLoader: tasks_per_step must be between 1 and the number of tasks ({len(self.tasks)}), "
                f"got {tasks_per_step}."
            )
        self.tasks_per_step = tasks_per_step
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"MultiTaskLoader: temperature must be a number > 0, got {temperature!r}.")
        if math.isnan(temperature) or temperature <= 0:
            raise ValueError(
                f"MultiTaskLoader: temperature must be > 0 (1: as the weights, inf: uniform), got {temperature!r}."
            )
        self.temperature = float(temperature)
        self.weights = weights
        self._raw_weights = _raw_weights(weights, self.loaders)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"MultiTaskLoader: seed must be a non-negative int or None, got {seed!r}.")
        self.seed = seed
        if steps_per_epoch is not None and (
            isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1
        ):
            raise ValueError(
                f"MultiTaskLoader: steps_per_epoch must be a positive int or None, got {steps_per_epoch!r}."
            )
        self.steps_per_epoch = steps_per_epoch
        self.use_distributed_sampler = bool(use_distributed_sampler)
        self._probs = _probabilities(self._raw_weights, self.temperature)
        # --- state (state_dict) ---
        self._seed: int | None = None  # resolved at the first epoch (or loaded)
        self._generator: torch.Generator | None = None
        self._epoch = -1  # index of the current epoch; -1 before the first
        self._position = 0  # steps yielded in the current epoch
        self._pass_index = dict.fromkeys(self.tasks, -1)  # each task's pass within the epoch (-1: none yet)
        self._pass_position = dict.fromkeys(self.tasks, 0)  # batches taken from the current pass
        self._world: tuple[int, int] | None = None  # (world size, rank) the state's positions refer to
        self._world_prepared: tuple[int, int] | None = None
        self._resume = False  # a loaded state: the next __iter__ continues its epoch
        self._requested_epoch: int | None = None  # set_epoch()
        # --- runtime ---
        self._prepared: dict[str, _Prepared] | None = None
        self._iterators: dict[str, Iterator[Any]] = {}
        self._token = 0  # invalidates older iterators

    # ------------------------------------------------------------------ public properties
    @property
    def probabilities(self) -> dict[str, float]:
        """``{task: p_i}``: the probability of each task on a single draw (``mode="sampled"``)."""
        return dict(zip(self.tasks, self._probs.tolist()))

    @property
    def epoch(self) -> int:
        """The index of the current epoch (``-1`` before the first ``iter``)."""
        return self._epoch

    def __len__(self) -> int:
        """Steps per epoch on this rank."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        lengths = [p.length for p in self._prepare().values()]
        if self.mode == "joint":
            return max(lengths)
        return math.ceil(sum(lengths) / self.tasks_per_step)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{t}: {len(dl)} batches" for t, dl in self.loaders.items())
        extra = (
            "" if self.mode == "joint" else f", tasks_per_step={self.tasks_per_step}, p={self.probabilities}"
        )
        return f"MultiTaskLoader(mode={self.mode!r}, {{{sizes}}}{extra})"

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        # the epoch starts at the iterator's first next(), not here: Lightning calls iter() once just to check
        # that the loader is iterable
        return _EpochIterator(self)

    def _start(self) -> tuple[int, int]:
        """Start an epoch (or continue a loaded one); returns the new iterator's token and the epoch length."""
        self._prepare()
        length = len(self)
        requested = self._requested_epoch
        resume = (  # a loaded mid-epoch state, for the epoch the Trainer is in
            self._resume
            and 0 <= self._position < length
            and self._generator is not None
            and requested in (None, self._epoch)
        )
        if not resume:
            self._begin_epoch(requested if requested is not None else self._epoch + 1)
        self._resume = False
        self._requested_epoch = None
        self._token += 1
        return self._token, length

    def _begin_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` from its start: a function of (seed, epoch) only, so it needs no saved state."""
        self._epoch = epoch
        self._position = 0
        self._generator = torch.Generator().manual_seed(_mix(self._resolved_seed(), "draws", epoch))
        self._pass_index = dict.fromkeys(self.tasks, -1)
        self._pass_position = dict.fromkeys(self.tasks, 0)
        self._iterators = {}

    def set_epoch(self, epoch: int) -> None:
        """The index of the next epoch to start (Lightning calls it at every epoch start through
        ``loader.sampler.set_epoch``, as for a DistributedSampler; a loaded mid-epoch state takes precedence)."""
        self._requested_epoch = int(epoch)

    @property
    def sampler(self) -> _EpochSignal:
        """Lets Lightning's fit loop, which calls ``set_epoch(epoch)`` on each train loader's ``sampler`` at every
        epoch start, tell this loader the Trainer's epoch (see :meth:`set_epoch`)."""
        return _EpochSignal(self)

    def _next(self, token: int, length: int) -> dict[str, Any]:
        if token != self._token:
            raise RuntimeError(
                "MultiTaskLoader: this iterator is stale (another iteration of the loader has started since)."
            )
        if self._position >= length:
            raise StopIteration
        tasks = self.tasks if self.mode == "joint" else self._draw()
        batch = {t: self._next_batch(t) for t in tasks}
        self._position += 1
        return batch

    def _draw(self) -> list[str]:
        """One step's tasks, in the order of ``loaders`` (advances the generator)."""
        assert self._generator is not None
        picked = torch.multinomial(
            self._probs, self.tasks_per_step, replacement=False, generator=self._generator
        )
        chosen = set(picked.tolist())
        return [t for i, t in enumerate(self.tasks) if i in chosen]

    def _next_batch(self, task: str) -> Any:
        prepared = self._prepare()[task]
        iterator = self._iterators.get(task)
        if iterator is None:  # first use, or after a resume: continue the current pass if it is not over
            index, position = self._pass_index[task], self._pass_position[task]
            if index < 0 or position >= prepared.length:
                index, position = index + 1, 0
            iterator = self._open(task, index, position)
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = self._open(task, self._pass_index[task] + 1, 0)
            try:
                batch = next(iterator)
            except StopIteration:
                raise RuntimeError(
                    f"MultiTaskLoader: the loader of task {task!r} yielded no batch."
                ) from None
        self._pass_position[task] += 1
        return batch

    def _open(self, task: str, index: int, position: int) -> Iterator[Any]:
        self._pass_index[task] = index
        self._pass_position[task] = position
        key = _mix(self._resolved_seed(), "pass", task, self._epoch, index)
        iterator = self._prepare()[task].open(key, position)
        self._iterators[task] = iterator
        return iterator

    # ------------------------------------------------------------------ preparing the loaders
    def _resolved_seed(self) -> int:
        if self._seed is None:
            if self.seed is not None:
                self._seed = self.seed
            else:
                self._seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return self._seed

    def _prepare(self) -> dict[str, _Prepared]:
        """The loaders as iterated on this rank; rebuilt when the distributed setting changes."""
        world = _world()
        if self._prepared is not None and self._world_prepared == world:
            return self._prepared
        if self._world is not None and self._world[0] != world[0] and self._resume:
            raise RuntimeError(
                f"MultiTaskLoader: its state was made with {self._world[0]} process(es) but it now runs with "
                f"{world[0]}: the positions in its state are per-rank batch counts. Resume with {self._world[0]} "
                "process(es), or start the loader afresh (a new MultiTaskLoader, without loading its state)."
            )
        if (
            self._world is not None and self._world[0] != world[0]
        ):  # not a resume: passes restart, sharded anew
            for task, index in self._pass_index.items():
                if index >= 0:
                    self._pass_index[task], self._pass_position[task] = index + 1, 0
        self._prepared = {
            task: _prepare_loader(task, dl, world, self.use_distributed_sampler)
            for task, dl in self.loaders.items()
        }
        self._world_prepared = world
        self._world = world
        self._iterators = {}
        return self._prepared

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The draw's state: tensors and primitives only (``torch.load(weights_only=True)`` loads it)."""
        return {
            "version": _STATE_VERSION,
            "mode": self.mode,
            "tasks": list(self.tasks),
            "tasks_per_step": self.tasks_per_step,
            "probabilities": self._probs.tolist(),
            "seed": self._seed if self._seed is not None else self.seed,
            "world_size": self._world[0] if self._world is not None else None,
            "epoch": self._epoch,
            "position": self._position,
            "pass_index": dict(self._pass_index),
            "pass_position": dict(self._pass_position),
            "generator": self._generator.get_state() if self._generator is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next ``iter`` continues the saved epoch (or starts the next one if the
        saved epoch was complete). A different task set or configuration is an error."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                "MultiTaskLoader.load_state_dict: not a MultiTaskLoader state (or another version)."
            )
        problems = []
        if sorted(state["tasks"]) != sorted(self.tasks):
            problems.append(f"tasks {sorted(state['tasks'])} (now {sorted(self.tasks)})")
        if state["mode"] != self.mode:
            problems.append(f"mode={state['mode']!r} (now {self.mode!r})")
        if self.mode == "sampled":
            if state["tasks_per_step"] != self.tasks_per_step:
                problems.append(f"tasks_per_step={state['tasks_per_step']} (now {self.tasks_per_step})")
            saved = dict(zip(state["tasks"], state["probabilities"]))
            now = self.probabilities
            if set(saved) == set(now) and any(not math.isclose(saved[t], now[t], rel_tol=1e-9) for t in now):
                problems.append(f"probabilities {saved} (now {now})")
        if self.seed is not None and state["seed"] is not None and state["seed"] != self.seed:
            problems.append(f"seed={state['seed']} (now {self.seed})")
        if problems:
            raise ValueError(
                "MultiTaskLoader.load_state_dict: the state was saved with another configuration: "
                + "; ".join(problems)
                + ". Resume with the same loaders and arguments, or start this loader afresh."
            )
        self._seed = state["seed"]
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._pass_index = {t: int(state["pass_index"][t]) for t in self.tasks}
        self._pass_position = {t: int(state["pass_position"][t]) for t in self.tasks}
        generator = state["generator"]
        if generator is None:
            self._generator = None
        else:
            self._generator = torch.Generator()
            self._generator.set_state(generator)
        saved_world = state["world_size"]
        self._world = None if saved_world is None else (int(saved_world), -1)
        self._prepared = None  # rebuilt with the loaded seed
        self._iterators = {}
        self._token += 1
        self._resume = True

    def __getstate__(self) -> dict[str, Any]:  # pickled to ddp_spawn workers: no live iterators or generator
        state = self.__dict__.copy()
        state["_prepared"] = None
        state["_iterators"] = {}
        generator = state.pop("_generator")
        state["_generator_state"] = generator.get_state() if generator is not None else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator_state = state.pop("_generator_state")
        self.__dict__.update(state)
        self._generator = None
        if generator_state is not None:
            self._generator = torch.Generator()
            self._generator.set_state(generator_state)


class _EpochSignal:
    def __init__(self, owner: MultiTaskLoader) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class _EpochIterator(Iterator[dict[str, Any]]):
    def __init__(self, owner: MultiTaskLoader) -> None:
        self.owner = owner
        self.token: int | None = None
        self.length = 0

    def __next__(self) -> dict[str, Any]:
        if self.token is None:
            self.token, self.length = self.owner._start()
        return self.owner._next(self.token, self.length)

    def __iter__(self) -> _EpochIterator:
        return self


# ---------------------------------------------------------------------- evaluation
class _KeyedCollate:
    """``collate_fn`` that keys the collated batch by its task: ``{task: collate(samples)}`` (picklable)."""

    def __init__(self, task: str, collate_fn: Any) -> None:
        self.task = task
        self.collate_fn = collate_fn

    def __call__(self, samples: Any) -> dict[str, Any]:
        return {self.task: self.collate_fn(samples)}


def task_eval_loaders(loaders: Mapping[str, DataLoader]) -> list[DataLoader]:
    """One evaluation loader per task, for ``val_dataloader`` / ``test_dataloader``: a list in the order of
    ``loaders`` (``dataloader_idx`` ``k`` is the ``k``-th task) whose batches are ``{task: batch}``, keyed like
    :class:`MultiTaskLoader`'s, so the same ``task_losses`` serves training and evaluation.

    The loaders keep their dataset, sampler and batch size (only ``collate_fn`` is wrapped), so Lightning shards
    them under DDP as usual. Each batch holds one task: declare the tasks ``Task(name, partial=True)`` so that the
    others may be absent from what ``task_losses`` returns.
    """
    checked = _check_loaders(loaders)
    out = []
    for task, dl in checked.items():
        if type(dl) is not DataLoader:
            raise ValueError(
                f"task_eval_loaders: the loader of task {task!r} is a {type(dl).__name__}; only plain DataLoaders "
                "can be rebuilt (key the batches in your collate_fn instead)."
            )
        if dl.batch_sampler is not None and (
            type(dl.batch_sampler) is BatchSampler and dl.batch_sampler.sampler is dl.sampler
        ):
            kwargs: dict[str, Any] = {
                "batch_size": dl.batch_size,
                "sampler": dl.sampler,
                "drop_last": dl.drop_last,
            }
        elif dl.batch_sampler is not None:
            kwargs = {"batch_sampler": dl.batch_sampler}
        else:
            kwargs = {"batch_size": None, "sampler": dl.sampler}
        out.append(_rebuild(dl, collate_fn=_KeyedCollate(task, dl.collate_fn), **kwargs))
    return out


# ---------------------------------------------------------------------- helpers
def _check_loaders(loaders: Any) -> dict[str, DataLoader]:
    if not isinstance(loaders, Mapping):
        raise ValueError(
            f"MultiTaskLoader: loaders must be a dict {{task: DataLoader}}, got {type(loaders).__name__}."
        )
    if not loaders:
        raise ValueError(
            "MultiTaskLoader: loaders is empty; give one DataLoader per task, {task: DataLoader}."
        )
    out: dict[str, DataLoader] = {}
    for task, dl in loaders.items():
        if not isinstance(task, str) or not task:
            raise ValueError(f"MultiTaskLoader: task names must be non-empty strings, got {task!r}.")
        if not isinstance(dl, DataLoader):
            raise ValueError(
                f"MultiTaskLoader: the loader of task {task!r} is a {type(dl).__name__}, not a "
                "torch.utils.data.DataLoader. Wrap the dataset: DataLoader(dataset, batch_size=..., shuffle=...)."
            )
        if isinstance(dl.dataset, IterableDataset):
            raise ValueError(
                f"MultiTaskLoader: the loader of task {task!r} has an iterable-style dataset; only map-style "
                "datasets (with __len__ and __getitem__) are supported (they can be sharded, cycled and resumed)."
            )
        if len(dl) == 0:
            raise ValueError(
                f"MultiTaskLoader: the loader of task {task!r} has no batch (dataset of {len(dl.dataset)} samples, "  # type: ignore[arg-type]
                f"batch_size={dl.batch_size}, drop_last={dl.drop_last}). Give it data or a smaller batch size."
            )
        out[task] = dl
    return out


def _raw_weights(weights: Any, loaders: dict[str, DataLoader]) -> list[float]:
    tasks = list(loaders)
    if isinstance(weights, str):
        if weights == "uniform":
            return [1.0] * len(tasks)
        if weights == "proportional":
            return [float(len(dl.dataset)) for dl in loaders.values()]  # type: ignore[arg-type]
        raise ValueError(
            f"MultiTaskLoader: weights must be 'uniform', 'proportional' or {{task: weight}}, got {weights!r}."
        )
    if not isinstance(weights, Mapping):
        raise ValueError(
            f"MultiTaskLoader: weights must be 'uniform', 'proportional' or {{task: weight}}, got "
            f"{type(weights).__name__}."
        )
    unknown = [t for t in weights if t not in loaders]
    if unknown:
        raise ValueError(f"MultiTaskLoader: weights name unknown task(s) {unknown}; the tasks are {tasks}.")
    missing = [t for t in tasks if t not in weights]
    if missing:
        raise ValueError(
            f"MultiTaskLoader: weights has no weight for task(s) {missing}; give one for every task."
        )
    out = []
    for t in tasks:
        w = weights[t]
        if isinstance(w, torch.Tensor) and w.numel() == 1:
            w = w.item()
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(
                f"MultiTaskLoader: the weight of task {t!r} must be a finite number > 0, got {w!r} "
                "(leave a task out of the loaders to never draw it)."
            )
        out.append(float(w))
    return out


def _probabilities(weights: list[float], temperature: float) -> torch.Tensor:
    """``p_i ∝ w_i^{1/τ}``, computed in log space (float64)."""
    logits = torch.tensor(weights, dtype=torch.float64).log() / temperature
    return torch.softmax(logits, 0)


def _mix(*parts: Any) -> int:
    """A 62-bit seed from ``parts`` (stable across processes and Python runs, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _set_epoch(dl: DataLoader, epoch: int) -> None:
    for sampler in (dl.sampler, getattr(dl.batch_sampler, "sampler", None), dl.batch_sampler):
        if sampler is not None and callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)
            return


def _default_shuffle(dl: DataLoader) -> bool | None:
    """``True``/``False`` for a loader built with ``shuffle=True``/``False`` (default samplers), else ``None``."""
    sampler = dl.sampler
    if type(sampler) is RandomSampler:
        if sampler.replacement or sampler._num_samples is not None:
            return None
        shuffle = True
    elif type(sampler) is SequentialSampler:
        shuffle = False
    else:
        return None
    if dl.batch_sampler is not None and not (
        type(dl.batch_sampler) is BatchSampler and dl.batch_sampler.sampler is sampler
    ):
        return None  # a custom batch sampler
    return shuffle


def _prepare_loader(
    task: str, dl: DataLoader, world: tuple[int, int], use_distributed_sampler: bool
) -> _Prepared:
    world_size, rank = world
    shuffle = _default_shuffle(dl) if use_distributed_sampler and type(dl) is DataLoader else None
    if shuffle is None:
        if use_distributed_sampler and world_size > 1 and not isinstance(dl.sampler, DistributedSampler):
            raise ValueError(
                f"MultiTaskLoader: the loader of task {task!r} has a custom sampler, batch sampler or class "
                f"({type(dl).__name__}, {type(dl.sampler).__name__}), which it cannot shard over {world_size} "
                "processes. Give it a DistributedSampler yourself, or build it with shuffle=True/False."
            )
        return _Prepared(dl, None)
    # seed 0: a pass's permutation is set by set_epoch(<the pass's key, from seed, task, epoch and pass>)
    seeded = DistributedSampler(dl.dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=0)
    # the DataLoader draws its workers' base seed from its generator (the global RNG when it has none): give it
    # one, reseeded every pass, so that iterating never touches the global RNG and worker seeds are reproducible
    generator = torch.Generator() if dl.generator is None else None
    options: dict[str, Any] = {} if generator is None else {"generator": generator}
    if (
        int(os.environ.get("PL_SEED_WORKERS", 0)) and dl.worker_init_fn is None
    ):  # seed_everything(workers=True)
        from lightning.fabric.utilities.seed import pl_worker_init_function

        options["worker_init_fn"] = functools.partial(pl_worker_init_function, rank=rank)
    if dl.batch_sampler is not None:
        pass_sampler = _PassSampler(BatchSampler(seeded, dl.batch_size, dl.drop_last), seeded)  # type: ignore[arg-type]
        rebuilt = _rebuild(dl, batch_sampler=pass_sampler, **options)
    else:  # no automatic batching: the sampler yields single indices
        pass_sampler = _PassSampler(seeded, seeded)
        rebuilt = _rebuild(dl, batch_size=None, sampler=pass_sampler, **options)
    return _Prepared(rebuilt, pass_sampler, generator)


def _rebuild(dl: DataLoader, collate_fn: Any = None, **kwargs: Any) -> DataLoader:
    """A plain DataLoader over ``dl``'s dataset with ``dl``'s loading options and the given sampling."""
    options: dict[str, Any] = {
        "num_workers": dl.num_workers,
        "collate_fn": collate_fn if collate_fn is not None else dl.collate_fn,
        "pin_memory": dl.pin_memory,
        "timeout": dl.timeout,
        "worker_init_fn": kwargs.pop("worker_init_fn", dl.worker_init_fn),
        "multiprocessing_context": dl.multiprocessing_context,
        "generator": kwargs.pop("generator", dl.generator),
        "prefetch_factor": dl.prefetch_factor,
        "persistent_workers": dl.persistent_workers,
        "pin_memory_device": dl.pin_memory_device,
    }
    if hasattr(dl, "in_order"):
        options["in_order"] = dl.in_order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DataLoader(dl.dataset, **kwargs, **options)
