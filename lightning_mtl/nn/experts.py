"""Mixture-of-experts architectures: :class:`MMoE` (one softmax gate per task over shared experts) and
:class:`CGC` / :class:`PLE` (shared plus task-specific experts, stacked in extraction levels).

Long because MMoE, CGC and PLE share their expert, gate and tower builders, input checks and gate bookkeeping: one
file keeps those private helpers beside the three classes that use them.

Every task reads its own mixture of expert outputs, so there is no single shared representation
(``mode="representation"`` is refused). Each forward stores the gate weights it used in ``last_gates``
(detached) so that a user can log them, e.g. with :func:`gate_entropy` to watch for gate collapse.
The private helpers here (expert / tower building, mixing, argument checks) are also used by
:mod:`lightning_mtl.nn.dselect_k`; the file is long (≈600 lines) because the three classes share them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_mtl.nn.base import MultiTaskArchitecture, default_conv_stack, default_mlp

__all__ = ["CGC", "MMoE", "PLE", "gate_entropy"]

InputShape = int | Sequence[int]
Towers = Mapping[str, nn.Module] | nn.ModuleDict | Callable[[str], nn.Module] | None
Experts = Sequence[nn.Module] | nn.ModuleList | Callable[[], nn.Module] | None

_MIXTURE_REASON = (
    "{name} has no single shared representation: every task's tower reads its own gated mixture of the "
    "experts' outputs; use a gradient strategy with mode='parameters' (the default) instead."
)


# ---------------------------------------------------------------------------------------------------- helpers
def gate_entropy(weights: Tensor) -> Tensor:
    """Mean entropy (nats) of gate weights ``[..., n]`` over the leading dimensions: ``log n`` for a uniform gate,
    0 for a gate that picks one expert (collapse). Works on the tensors of an architecture's ``last_gates``."""
    w = weights.clamp_min(0)
    return -(w * torch.log(w.clamp_min(1e-12))).sum(-1).mean()


def _is_module_sequence(value: object) -> bool:
    """A list / tuple / ``nn.ModuleList`` of modules (not a string, not a factory)."""
    return isinstance(value, nn.ModuleList) or (isinstance(value, Sequence) and not isinstance(value, str))


def _positive_int(owner: str, name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner} {name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _widths(owner: str, name: str, value: object, *, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or (not allow_empty and len(value) == 0)
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        need = "a sequence of positive integers" + ("" if allow_empty else " (at least one)")
        raise ValueError(f"{owner} {name} must be {need}, got {value!r}.")
    return tuple(value)


def _input_shape(owner: str, input_shape: object) -> tuple[int, ...]:
    """``(d,)`` for vector input, ``(C, H, W)`` for images."""
    if isinstance(input_shape, int) and not isinstance(input_shape, bool):
        input_shape = (input_shape,)
    if (
        isinstance(input_shape, str)
        or not isinstance(input_shape, Sequence)
        or len(input_shape) not in (1, 3)
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in input_shape)
    ):
        raise ValueError(
            f"{owner} input_shape must be the size of one example without the batch dimension: an int d for "
            f"vectors [B, d] or (C, H, W) for images [B, C, H, W], got {input_shape!r}."
        )
    return tuple(input_shape)


def _default_expert(shape: tuple[int, ...], hidden: tuple[int, ...]) -> nn.Module:
    """An MLP for vectors; for images a conv stack followed by global average pooling (a vector of hidden[-1])."""
    if len(shape) == 1:
        return default_mlp(shape[0], hidden)
    return nn.Sequential(default_conv_stack(shape[0], hidden), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _out_features(owner: str, tasks: Sequence[str], out_features: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(out_features, Mapping):
        missing = [t for t in tasks if t not in out_features]
        extra = [t for t in out_features if t not in tasks]
        if missing or extra:
            raise ValueError(
                f"{owner} out_features must give one width per task: missing {missing}, unknown {extra} "
                f"(tasks are {list(tasks)})."
            )
        return {t: _positive_int(owner, f"out_features[{t!r}]", out_features[t]) for t in tasks}
    width = _positive_int(owner, "out_features", out_features)
    return {t: width for t in tasks}


def _build_towers(
    owner: str,
    tasks: Sequence[str],
    towers: Towers,
    *,
    in_features: int | None,
    hidden: tuple[int, ...],
    out_features: int | Mapping[str, int],
) -> nn.ModuleDict:
    """One tower per task: the user's (mapping or ``factory(task)``) or flatten → MLP(hidden) → Linear."""
    if towers is None:
        if in_features is None:
            raise ValueError(
                f"{owner} needs expert_out_features (the number of elements of one expert output per example) "
                "to build the default towers for custom experts; pass it, or pass your own towers."
            )
        widths = _out_features(owner, tasks, out_features)
        built = {}
        for t in tasks:
            mlp = default_mlp(in_features, hidden)
            last = hidden[-1] if hidden else in_features
            built[t] = nn.Sequential(nn.Flatten(), *mlp, nn.Linear(last, widths[t]))
        return nn.ModuleDict(built)
    if isinstance(towers, (Mapping, nn.ModuleDict)):
        missing = [t for t in tasks if t not in towers]
        extra = [t for t in towers if t not in tasks]
        if missing or extra:
            raise ValueError(
                f"{owner} towers must hold one module per task: missing {missing}, unknown {extra} "
                f"(tasks are {list(tasks)})."
            )
        modules = {t: towers[t] for t in tasks}
    elif callable(towers) and not isinstance(towers, nn.Module):
        modules = {t: towers(t) for t in tasks}
    else:
        raise ValueError(
            f"{owner} towers must be None (default MLP towers), a mapping task -> nn.Module or a factory "
            f"task -> nn.Module, got {type(towers).__name__}."
        )
    bad = [t for t, m in modules.items() if not isinstance(m, nn.Module)]
    if bad:
        raise ValueError(f"{owner} towers must be nn.Module instances; not for tasks {bad}.")
    if len({id(m) for m in modules.values()}) != len(modules):
        raise ValueError(
            f"{owner} towers must be distinct module instances (one per task), not one shared module."
        )
    return nn.ModuleDict(modules)


def _build_experts(
    owner: str,
    experts: Experts,
    num_experts: int | None,
    default: Callable[[], nn.Module],
) -> nn.ModuleList:
    """The shared experts of MMoE / DSelect-k: given instances, ``num_experts`` calls of a factory, or defaults."""
    if experts is None or (callable(experts) and not isinstance(experts, nn.Module)):
        if num_experts is None:
            raise ValueError(f"{owner} needs num_experts (how many experts to build), got None.")
        n = _positive_int(owner, "num_experts", num_experts)
        factory = default if experts is None else experts
        built = [factory() for _ in range(n)]
    elif _is_module_sequence(experts):
        built = list(experts)  # type: ignore[arg-type]
        if num_experts is not None and num_experts != len(built):
            raise ValueError(
                f"{owner} got {len(built)} expert modules but num_experts={num_experts!r}; pass one or the other."
            )
        if not built:
            raise ValueError(f"{owner} experts must not be empty.")
    else:
        raise ValueError(
            f"{owner} experts must be None (default experts), a sequence of nn.Module or a zero-argument "
            f"factory, got {type(experts).__name__}."
        )
    bad = [i for i, m in enumerate(built) if not isinstance(m, nn.Module)]
    if bad:
        raise ValueError(f"{owner} experts must be nn.Module instances; entries {bad} are not.")
    if len({id(m) for m in built}) != len(built):
        raise ValueError(
            f"{owner} experts must be distinct module instances; the same module was given more than once "
            "(use a factory such as `lambda: make_expert()` to build independent experts)."
        )
    return nn.ModuleList(built)


def _flat_size(owner: str, x: Tensor, expected: int, what: str) -> Tensor:
    flat = x.flatten(1)
    if flat.shape[1] != expected:
        raise ValueError(
            f"{owner} {what} has {flat.shape[1]} elements per example (shape {tuple(x.shape)}) but the gates "
            f"were built for {expected}; fix input_shape / expert_out_features."
        )
    return flat


def _mix(weights: Tensor, outputs: Tensor) -> Tensor:
    """``Σ_i weights[..., i] · outputs[i]`` for ``weights`` ``[B, n]`` (or ``[n]``) and ``outputs`` ``[n, B, ...]``."""
    w = weights.t() if weights.dim() == 2 else weights
    w = w.reshape(w.shape + (1,) * (outputs.dim() - w.dim()))
    return (w * outputs).sum(0)


class _Gate(nn.Module):
    """``softmax(W x + b)`` over ``n`` experts, ``x`` flattened per example (the paper's eq.: softmax(W_t x))."""

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.linear(x.flatten(1)), dim=-1)


# ---------------------------------------------------------------------------------------------------- MMoE
class MMoE(MultiTaskArchitecture):
    """Multi-gate Mixture-of-Experts.

    Jiaqi Ma, Zhe Zhao, Xinyang Yi, Jilin Chen, Lichan Hong, Ed H. Chi, "Modeling Task Relationships in
    Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018 (doi:10.1145/3219819.3220007).

    ``n`` shared experts ``f_i``; task ``t`` has a gate ``g^t(x) = softmax(W_t x + b_t)`` and a tower ``h^t``:
    ``y_t = h^t(Σ_i g^t(x)_i f_i(x))`` (the paper's eqs. 6-8). Every gate's weights are ≥ 0 and sum to 1 per
    example; with one expert the model is hard parameter sharing.

    Defaults (the paper's synthetic-data setting, from memory of the paper — sizes are unverified): 8 experts,
    each one hidden layer of 16 units (ReLU), towers with one hidden layer of 8 units. Conventions that differ
    from the paper: the gate has a bias (as in LibMTL; eq. 8 has none) and reads the input flattened per example.

    Shared parameters: the experts. Task-specific: the gates and towers. ``mode="representation"`` is not
    supported: each tower reads its own mixture (:attr:`representation_unsupported`).

    Args:
        tasks: the task names, in order.
        input_shape: one example's shape without the batch dimension, ``d`` (vectors) or ``(C, H, W)`` (images);
            the gates read it flattened, the default experts are an MLP (vectors) or a conv stack with global
            average pooling (images).
        num_experts: how many experts to build (``None``: 8, or the length of ``experts`` when it is a
            sequence).
        experts: ``None`` for default experts, a zero-argument factory called ``num_experts`` times, or a
            sequence of distinct modules (e.g. ResNet trunks), each mapping the input to same-shaped features.
        expert_hidden: hidden widths of the default experts (their output width is the last one).
        expert_out_features: elements of one expert output per example; needed with custom experts and default
            towers (defaults to ``expert_hidden[-1]`` for default experts).
        towers: ``None`` for default towers (flatten → MLP(``tower_hidden``) → Linear(``out_features``)), a mapping
            task → module, or a factory ``task -> module``.
        tower_hidden: hidden widths of the default towers.
        out_features: output width of the default towers, one int or one per task.

    Attributes:
        last_gates: the gate weights ``{task: [B, n]}`` of the last forward (detached), e.g. for
            :func:`gate_entropy`.

    Example::

        arch = MMoE(["ctr", "cvr"], input_shape=32, num_experts=4)
        out = arch(torch.randn(5, 32))                  # {"ctr": [5, 1], "cvr": [5, 1]}
        gate_entropy(arch.last_gates["ctr"])            # log it to watch gate collapse
    """

    representation_unsupported = _MIXTURE_REASON.format(name="MMoE")

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: InputShape,
        *,
        num_experts: int | None = None,
        experts: Experts = None,
        expert_hidden: Sequence[int] = (16,),
        expert_out_features: int | None = None,
        towers: Towers = None,
        tower_hidden: Sequence[int] = (8,),
        out_features: int | Mapping[str, int] = 1,
    ) -> None:
        super().__init__(tasks)
        name = type(self).__name__
        shape = _input_shape(name, input_shape)
        hidden = _widths(name, "expert_hidden", expert_hidden)
        if num_experts is None and not _is_module_sequence(experts):
            num_experts = 8  # the paper's count
        self.experts = _build_experts(name, experts, num_experts, lambda: _default_expert(shape, hidden))
        self.num_experts = len(self.experts)
        self.in_features = math.prod(shape)
        self.gates = nn.ModuleDict({t: _Gate(self.in_features, self.num_experts) for t in self.task_names})
        if expert_out_features is None and experts is None:
            expert_out_features = hidden[-1]
        self.towers = _build_towers(
            name,
            self.task_names,
            towers,
            in_features=expert_out_features,
            hidden=_widths(name, "tower_hidden", tower_hidden, allow_empty=True),
            out_features=out_features,
        )
        self.last_gates: dict[str, Tensor] = {}

    def shared_modules(self) -> list[nn.Module]:
        return [self.experts]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        flat = _flat_size(type(self).__name__, x, self.in_features, "the input")
        outputs = torch.stack([expert(x) for expert in self.experts])  # [n, B, ...]
        result, gates = {}, {}
        for t in self.task_names:
            g = self.gates[t](flat)
            gates[t] = g.detach()
            result[t] = self.towers[t](_mix(g, outputs))
        self.last_gates = gates
        return result


# ---------------------------------------------------------------------------------------------------- CGC / PLE
class _ExtractionLevel(nn.Module):
    """One CGC level: per task ``m_t`` experts and a gate over [own experts; shared experts]; ``m_s`` shared
    experts; with ``shared_gate`` also a gate over every expert (all tasks' then the shared ones) that feeds the
    next level's shared experts."""

    def __init__(
        self,
        tasks: Sequence[str],
        make_expert: Callable[[], nn.Module],
        num_task_experts: int,
        num_shared_experts: int,
        gate_in_features: int,
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.task_experts = nn.ModuleDict(
            {t: nn.ModuleList([make_expert() for _ in range(num_task_experts)]) for t in tasks}
        )
        self.shared_experts = nn.ModuleList([make_expert() for _ in range(num_shared_experts)])
        self.task_gates = nn.ModuleDict(
            {t: _Gate(gate_in_features, num_task_experts + num_shared_experts) for t in tasks}
        )
        self.shared_gate = (
            _Gate(gate_in_features, len(tasks) * num_task_experts + num_shared_experts)
            if shared_gate
            else None
        )

    def forward(
        self, task_inputs: Mapping[str, Tensor], shared_input: Tensor, check: Callable[[Tensor], Tensor]
    ) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        shared_out = [e(shared_input) for e in self.shared_experts]  # computed once, not once per task
        task_out = {t: [e(task_inputs[t]) for e in self.task_experts[t]] for t in self.tasks}
        mixtures, gates = {}, {}
        for t in self.tasks:
            g = self.task_gates[t](check(task_inputs[t]))
            gates[t] = g.detach()
            mixtures[t] = _mix(g, torch.stack(task_out[t] + shared_out))
        shared_mixture = None
        if self.shared_gate is not None:
            g = self.shared_gate(check(shared_input))
            gates["shared"] = g.detach()
            everything = [o for t in self.tasks for o in task_out[t]] + shared_out
            shared_mixture = _mix(g, torch.stack(everything))
        return mixtures, shared_mixture, gates


class PLE(MultiTaskArchitecture):
    """Progressive Layered Extraction: stacked CGC levels.

    Hongyan Tang, Junning Liu, Ming Zhao, Xudong Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task
    Learning (MTL) Model for Personalized Recommendations", RecSys 2020 (doi:10.1145/3383313.3412236).

    Level ``j`` has ``m_t`` experts per task and ``m_s`` shared experts. Task ``t``'s experts read the task
    stream ``g^{t,j-1}`` and the shared experts the shared stream ``g^{s,j-1}`` (``g^{·,0} = x``); task ``t``'s
    gate ``softmax(W^{t,j} g^{t,j-1})`` mixes only its own and the shared experts (never another task's),
    giving ``g^{t,j}``; at every level but the last a shared gate ``softmax(W^{s,j} g^{s,j-1})`` mixes all
    experts into ``g^{s,j}``. ``y_t = tower_t(g^{t,N})``. One level is :class:`CGC`. The shared experts run
    once per level on the shared stream (LibMTL's PLE instead reruns them on every task's stream and has no
    shared gate, a different model with T× the shared-expert compute).

    Defaults (unverified against the paper's experiments): 2 levels, 1 expert per task and 1 shared expert per
    level, experts with one hidden layer of 16 units, towers with one hidden layer of 8. The gates have a bias
    and read their input flattened per example.

    **What is shared** (exactly the parameters ≥ 2 tasks' outputs depend on): the shared experts of every level,
    the shared gates, and — through the shared gate that mixes them into the shared stream — the task experts of
    every level but the last and the task gates of every level below the last two. Task-specific: the last
    level's task experts, the task gates of the last two levels, and the towers. For :class:`CGC` that is
    the shared experts vs the task experts, gates and towers. ``mode="representation"`` is not supported.

    Args:
        tasks: the task names, in order.
        input_shape: one example's shape, ``d`` or ``(C, H, W)``; level 0's gates read it flattened.
        num_levels: ``N``, the number of extraction levels (default 2).
        num_task_experts: experts per task per level (default 1).
        num_shared_experts: shared experts per level (default 1).
        expert: ``None`` for default experts (level 0: an MLP, or a conv stack with global average pooling for
            images; above: an MLP on the previous level's mixtures), or a factory ``level -> nn.Module``
            (``level`` counts from 0; level 0 experts read ``x``, the others a previous level's mixture, which
            has an expert output's shape).
        expert_hidden: hidden widths of the default experts.
        expert_out_features: elements of one expert output per example; needed with a custom ``expert``
            (for the gates of levels > 0 and for default towers).
        towers, tower_hidden, out_features: as in :class:`MMoE`.

    Attributes:
        last_gates: the gate weights of the last forward (detached): ``{task: [B, m_t + m_s]}`` for the last
            level (what the towers read) and, for lower levels ``j``, ``"level{j}/{task}"`` and
            ``"level{j}/shared"`` (``[B, T·m_t + m_s]``, task experts in task order, then the shared ones).

    Example::

        arch = PLE(["ctr", "cvr"], input_shape=32, num_levels=2, num_task_experts=2, num_shared_experts=1)
        out = arch(torch.randn(5, 32))                  # {"ctr": [5, 1], "cvr": [5, 1]}
        arch.last_gates["level0/shared"].shape          # [5, 2·2 + 1]: every expert of level 0
    """

    representation_unsupported = _MIXTURE_REASON.format(name="PLE")

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: InputShape,
        *,
        num_levels: int = 2,
        num_task_experts: int = 1,
        num_shared_experts: int = 1,
        expert: Callable[[int], nn.Module] | None = None,
        expert_hidden: Sequence[int] = (16,),
        expert_out_features: int | None = None,
        towers: Towers = None,
        tower_hidden: Sequence[int] = (8,),
        out_features: int | Mapping[str, int] = 1,
    ) -> None:
        super().__init__(tasks)
        name = type(self).__name__
        shape = _input_shape(name, input_shape)
        levels = _positive_int(name, "num_levels", num_levels)
        m_t = _positive_int(name, "num_task_experts", num_task_experts)
        m_s = _positive_int(name, "num_shared_experts", num_shared_experts)
        hidden = _widths(name, "expert_hidden", expert_hidden)
        if expert is not None and (not callable(expert) or isinstance(expert, nn.Module)):
            raise ValueError(
                f"{name} expert must be None (default experts) or a factory `level -> nn.Module` that builds a "
                f"fresh expert per call, got {type(expert).__name__}."
            )
        if expert is None:
            expert_out_features = hidden[-1]
        elif expert_out_features is None and (levels > 1 or towers is None):
            raise ValueError(
                f"{name} with a custom expert factory needs expert_out_features (the number of elements of one "
                "expert output per example): the gates above level 0 and the default towers read it."
            )
        elif expert_out_features is not None:
            expert_out_features = _positive_int(name, "expert_out_features", expert_out_features)

        def factory(level: int) -> Callable[[], nn.Module]:
            if expert is not None:
                return lambda: _checked_module(name, expert(level))
            if level == 0:
                return lambda: _default_expert(shape, hidden)
            return lambda: default_mlp(hidden[-1], hidden)

        self.in_features = math.prod(shape)
        self.expert_out_features = expert_out_features
        self.levels = nn.ModuleList(
            _ExtractionLevel(
                self.task_names,
                factory(j),
                m_t,
                m_s,
                self.in_features if j == 0 else expert_out_features,  # type: ignore[arg-type]
                shared_gate=j < levels - 1,
            )
            for j in range(levels)
        )
        self.towers = _build_towers(
            name,
            self.task_names,
            towers,
            in_features=expert_out_features,
            hidden=_widths(name, "tower_hidden", tower_hidden, allow_empty=True),
            out_features=out_features,
        )
        self.last_gates: dict[str, Tensor] = {}

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def shared_modules(self) -> list[nn.Module]:
        n = len(self.levels)
        shared: list[nn.Module] = []
        for j, level in enumerate(self.levels):
            shared.append(level.shared_experts)
            if level.shared_gate is not None:
                shared.append(level.shared_gate)
            if j < n - 1:  # mixed into the shared stream by this level's shared gate
                shared.append(level.task_experts)
            if j < n - 2:  # feeds the next level's task experts, which the next shared gate mixes
                shared.append(level.task_gates)
        return shared

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        name = type(self).__name__
        task_streams: dict[str, Tensor] = {t: x for t in self.task_names}
        shared_stream: Tensor | None = x
        gates: dict[str, Tensor] = {}
        last = len(self.levels) - 1
        for j, level in enumerate(self.levels):
            size = self.in_features if j == 0 else self.expert_out_features
            what = "the input" if j == 0 else f"the level-{j - 1} mixture"

            check = functools.partial(_flat_size, name, expected=size, what=what)
            assert shared_stream is not None  # only the last level returns no shared stream
            task_streams, shared_stream, level_gates = level(task_streams, shared_stream, check)
            for key, g in level_gates.items():
                gates[key if j == last else f"level{j}/{key}"] = g
        self.last_gates = gates
        return {t: self.towers[t](task_streams[t]) for t in self.task_names}


def _checked_module(owner: str, module: object) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise ValueError(f"{owner} expert factory must return an nn.Module, got {type(module).__name__}.")
    return module


class CGC(PLE):
    """Customized Gate Control: one extraction level of :class:`PLE`.

    Hongyan Tang, Junning Liu, Ming Zhao, Xudong Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task
    Learning (MTL) Model for Personalized Recommendations", RecSys 2020 (doi:10.1145/3383313.3412236), Section
    4.2.

    ``m_s`` shared experts and ``m_t`` experts per task, all reading ``x``; task ``t``'s gate
    ``w^t(x) = softmax(W_t x + b_t)`` weighs only ``[E_t(x); E_s(x)]`` (its own and the shared experts, never
    another task's), ``y_t = tower_t(Σ_i w^t_i [E_t; E_s]_i)``.

    Defaults (unverified): 1 expert per task, 1 shared expert, experts with one hidden layer of 16 units,
    towers with one hidden layer of 8. Shared: the shared experts. Task-specific: the task experts, gates and
    towers. ``mode="representation"`` is not supported.

    Args:
        tasks, input_shape, num_task_experts, num_shared_experts, expert_hidden, expert_out_features, towers,
            tower_hidden, out_features: as in :class:`PLE`.
        expert: ``None`` for default experts, or a zero-argument factory building one expert on ``x``.

    Attributes:
        last_gates: ``{task: [B, m_t + m_s]}`` of the last forward (detached; own experts first).

    Example::

        arch = CGC(["ctr", "cvr"], input_shape=32, num_task_experts=2, num_shared_experts=2)
        out = arch(torch.randn(5, 32))                  # {"ctr": [5, 1], "cvr": [5, 1]}
        arch.last_gates["cvr"]                          # [5, 4]: cvr's 2 experts, then the 2 shared ones
    """

    representation_unsupported = _MIXTURE_REASON.format(name="CGC")

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: InputShape,
        *,
        num_task_experts: int = 1,
        num_shared_experts: int = 1,
        expert: Callable[[], nn.Module] | None = None,
        expert_hidden: Sequence[int] = (16,),
        expert_out_features: int | None = None,
        towers: Towers = None,
        tower_hidden: Sequence[int] = (8,),
        out_features: int | Mapping[str, int] = 1,
    ) -> None:
        if expert is not None and (not callable(expert) or isinstance(expert, nn.Module)):
            raise ValueError(
                f"CGC expert must be None (default experts) or a zero-argument factory that builds a fresh "
                f"expert per call, got {type(expert).__name__}."
            )
        super().__init__(
            tasks,
            input_shape,
            num_levels=1,
            num_task_experts=num_task_experts,
            num_shared_experts=num_shared_experts,
            expert=None if expert is None else (lambda level: expert()),
            expert_hidden=expert_hidden,
            expert_out_features=expert_out_features,
            towers=towers,
            tower_hidden=tower_hidden,
            out_features=out_features,
        )
