"""Hard parameter sharing (a shared trunk, tasks branching off at chosen depths) and several backbones in parallel
(MBMT-Net), plus the small builders the other architectures of :mod:`lightning_mtl.nn` use for their defaults.

A *stage* (or backbone, head) is given as an ``nn.Module`` or as a factory (a callable with no argument that returns
one); ``None`` builds the defaults: an MLP stage per width for vector input (``in_features``), a conv stage
(3×3 conv, BatchNorm, ReLU, 2× max-pool) per width for images (``in_channels``). A default head is a linear layer
on the features (globally average-pooled first when they are spatial), so it needs the feature width: known for
the default stages, declared with ``widths`` for the user's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl.nn.base import MultiTaskArchitecture, default_conv_stack, default_mlp

__all__ = ["HardSharing", "MultiBackbone"]

ModuleSpec = nn.Module | Callable[[], nn.Module]
HeadsSpec = Mapping[str, ModuleSpec] | Callable[[str], nn.Module] | None

DEFAULT_HIDDEN: tuple[int, ...] = (64, 64)  # default MLP widths (vector input)
DEFAULT_CHANNELS: tuple[int, ...] = (32, 64)  # default conv widths (image input)


# ---------------------------------------------------------------------------------------------- builders
def positive_int(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner} {name} must be a positive int, got {value!r}.")
    return value


def check_widths(owner: str, widths: Sequence[int] | None, name: str = "widths") -> list[int] | None:
    if widths is None:
        return None
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) == 0:
        raise ValueError(f"{owner} {name} must be a non-empty sequence of positive ints, got {widths!r}.")
    return [positive_int(owner, f"{name}[{i}]", w) for i, w in enumerate(widths)]


def build_module(owner: str, name: str, spec: object) -> nn.Module:
    """``spec`` itself when it is a module, else the module its factory returns (a clear error otherwise)."""
    if isinstance(spec, nn.Module):
        return spec
    if callable(spec):
        module = spec()
        if isinstance(module, nn.Module):
            return module
        raise ValueError(f"{owner} {name}: the factory returned {type(module).__name__}, not an nn.Module.")
    raise ValueError(
        f"{owner} {name} must be an nn.Module or a factory returning one, got {type(spec).__name__}: {spec!r}."
    )


def default_stages(
    owner: str, in_features: int | None, in_channels: int | None, widths: Sequence[int] | None
) -> tuple[list[nn.Module], list[int]]:
    """The default stages (one MLP layer or one conv block per width) and their output widths."""
    if (in_features is None) == (in_channels is None):
        raise ValueError(
            f"{owner}: without stages, pass exactly one of in_features= (vector input: MLP stages) or "
            f"in_channels= (images: conv stages), got in_features={in_features!r}, in_channels={in_channels!r}."
        )
    if in_features is not None:
        width = positive_int(owner, "in_features", in_features)
        ws = check_widths(owner, widths) or list(DEFAULT_HIDDEN)
        stages: list[nn.Module] = []
        for w in ws:
            stages.append(default_mlp(width, [w]))
            width = w
        return stages, ws
    width = positive_int(owner, "in_channels", in_channels)
    ws = check_widths(owner, widths) or list(DEFAULT_CHANNELS)
    stages = []
    for w in ws:
        stages.append(default_conv_stack(width, [w]))
        width = w
    return stages, ws


def user_stages(owner: str, name: str, stages: Sequence[ModuleSpec]) -> list[ModuleSpec]:
    """The user's stages as a non-empty list (modules or factories, not built yet)."""
    if isinstance(stages, nn.Module) and not isinstance(stages, (nn.Sequential, nn.ModuleList)):
        raise ValueError(
            f"{owner} {name} must be a sequence of stages (an nn.Sequential, nn.ModuleList or list of modules or "
            f"factories), got a single {type(stages).__name__}; wrap it: {name}=[module]."
        )
    if isinstance(stages, (str, bytes)) or not isinstance(stages, (Sequence, nn.Sequential, nn.ModuleList)):
        raise ValueError(f"{owner} {name} must be a sequence of modules or factories, got {stages!r}.")
    specs = list(stages)
    if not specs:
        raise ValueError(f"{owner} {name} must not be empty.")
    return specs


class PooledLinear(nn.Module):
    """The default head: a linear layer on the features, globally average-pooled first when they are spatial."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() > 2:
            z = z.flatten(2).mean(-1)
        return self.linear(z)


def out_sizes(owner: str, tasks: Sequence[str], out_features: int | Mapping[str, int]) -> dict[str, int]:
    """``out_features`` per task (one int for all, or a mapping naming every task)."""
    if isinstance(out_features, Mapping):
        missing = [t for t in tasks if t not in out_features]
        unknown = [t for t in out_features if t not in tasks]
        if missing or unknown:
            raise ValueError(
                f"{owner} out_features must name every task exactly: missing {missing!r}, unknown {unknown!r}."
            )
        return {t: positive_int(owner, f"out_features[{t!r}]", out_features[t]) for t in tasks}
    n = positive_int(owner, "out_features", out_features)
    return dict.fromkeys(tasks, n)


def build_heads(
    owner: str,
    tasks: Sequence[str],
    heads: HeadsSpec,
    in_widths: Mapping[str, int | None],
    out_features: int | Mapping[str, int],
) -> nn.ModuleDict:
    """One head per task: the user's (a mapping task → module/factory, or a factory called with the task name), or
    the default :class:`PooledLinear` on ``in_widths[task]`` features. An ``nn.ModuleDict`` counts as a mapping."""
    if heads is None:
        unknown = [t for t in tasks if in_widths[t] is None]
        if unknown:
            raise ValueError(
                f"{owner}: the default heads need the feature width, unknown for the user's stages. Pass "
                f"heads={{task: module}} or declare the stages' output widths with widths=[...] "
                f"(tasks {unknown!r})."
            )
        sizes = out_sizes(owner, tasks, out_features)
        return nn.ModuleDict({t: PooledLinear(int(in_widths[t]), sizes[t]) for t in tasks})  # type: ignore[arg-type]
    if isinstance(heads, (Mapping, nn.ModuleDict)):
        missing = [t for t in tasks if t not in heads]
        unknown = [t for t in heads if t not in tasks]
        if missing or unknown:
            raise ValueError(
                f"{owner} heads must have one entry per task: missing {missing!r}, unknown {unknown!r}."
            )
        built = {t: build_module(owner, f"heads[{t!r}]", heads[t]) for t in tasks}
    elif callable(heads) and not isinstance(heads, nn.Module):
        built = {}
        for t in tasks:
            module = heads(t)
            if not isinstance(module, nn.Module):
                raise ValueError(f"{owner} heads({t!r}) returned {type(module).__name__}, not an nn.Module.")
            built[t] = module
    else:
        raise ValueError(
            f"{owner} heads must be a mapping task → module (or factory), a factory called with the task name, "
            f"or None for the default linear heads; got {type(heads).__name__}."
        )
    if len({id(m) for m in built.values()}) != len(built):
        raise ValueError(
            f"{owner} heads: the same module object is given for several tasks, so nothing would be "
            "task-specific. Give each task its own module (or a factory)."
        )
    return nn.ModuleDict(built)


# ---------------------------------------------------------------------------------------------- HardSharing
class HardSharing(MultiTaskArchitecture):
    """Hard parameter sharing: a trunk of stages shared by the tasks, one head per task, and tasks may branch off
    at a lower stage.

    Caruana, "Multitask Learning", Machine Learning 28, 1997 (the shared trunk with one output per task), and
    Søgaard & Goldberg, "Deep multi-task learning with low level tasks supervised at lower layers", ACL 2016
    (a low-level task's head reads a lower layer: POS tagging at the innermost bi-RNN layer, chunking / CCG at the
    outer one). With stages ``f_1 … f_L`` and ``h^l = f_l(h^{l-1})``, ``h^0 = x``, task ``t`` branching at depth
    ``d_t`` outputs ``head_t(h^{d_t})``; plain hard sharing is ``d_t = L`` for every task (the default).

    **Shared.** Stage ``l`` is reached by the tasks with ``d_t ≥ l``: :meth:`shared_parameters` are the stages up
    to the second-highest branch depth (those ≥ 2 tasks reach); stages above it serve one task and count as its
    parameters (:meth:`task_parameters`), with the heads. A task branching at ``l`` gets no gradient into stages
    above ``l``. The marked shared representation (``mode="representation"``) is ``h^{d_min}``, the trunk output
    at the lowest branch point, which every task consumes; the stages above it read the marked tensor.

    The paper's model (stacked bi-RNNs, task sizes, one task per update step) is not reproduced: the stages are
    the user's modules or the defaults below. A recurrent stage must return a tensor (wrap an ``nn.LSTM``).

    Args:
        tasks: task names, in order.
        stages: the trunk, as modules or factories (``None``: the defaults from ``in_features`` / ``in_channels``).
        heads: ``{task: module or factory}``, or a factory called with the task name; ``None``: a linear head per
            task (:class:`PooledLinear`) on the features at its branch depth.
        branch_at: ``{task: l}`` with ``1 ≤ l ≤ L``: the task's head reads the output of stage ``l``; tasks not
            named read the last stage. The highest branch depth must be ``L`` (no unused stages).
        in_features: vector input width: default MLP stages (Linear + ReLU per width).
        in_channels: image channels: default conv stages (3×3 conv, BatchNorm, ReLU, 2× max-pool per width).
        widths: the default stages' widths (default ``(64, 64)`` MLP, ``(32, 64)`` conv), or, with the user's
            stages, their output widths (features / channels), needed only by the default heads.
        out_features: the default heads' output size (one int, or ``{task: int}``).

    Example::

        arch = HardSharing(["pos", "chunk"], in_features=16, widths=(32, 32), branch_at={"pos": 1})
        out = arch(torch.randn(4, 16))  # {"pos": (4, 1), "chunk": (4, 1)}
    """

    def __init__(
        self,
        tasks: Sequence[str],
        stages: Sequence[ModuleSpec] | None = None,
        heads: HeadsSpec = None,
        *,
        branch_at: Mapping[str, int] | None = None,
        in_features: int | None = None,
        in_channels: int | None = None,
        widths: Sequence[int] | None = None,
        out_features: int | Mapping[str, int] = 1,
    ) -> None:
        super().__init__(tasks)
        owner = type(self).__name__
        if stages is None:
            built, ws = default_stages(owner, in_features, in_channels, widths)
            stage_widths: list[int] | None = ws
        else:
            specs = user_stages(owner, "stages", stages)
            built = [build_module(owner, f"stages[{i}]", s) for i, s in enumerate(specs)]
            stage_widths = check_widths(owner, widths)
            if stage_widths is not None and len(stage_widths) != len(built):
                raise ValueError(
                    f"{owner} widths must give one output width per stage ({len(built)}), got {stage_widths!r}."
                )
        self.stages = nn.ModuleList(built)
        depth = len(self.stages)
        self.branch_at: dict[str, int] = self._branches(branch_at, depth)
        if max(self.branch_at.values()) != depth:
            raise ValueError(
                f"{owner}: no task reads the last stage (branch_at={dict(branch_at or {})!r}, {depth} stages), so "
                f"the stages above depth {max(self.branch_at.values())} would be unused. Drop them, or branch a "
                "task at the last stage."
            )
        in_widths = {
            t: (None if stage_widths is None else stage_widths[d - 1]) for t, d in self.branch_at.items()
        }
        self.heads = build_heads(owner, self.task_names, heads, in_widths, out_features)
        depths = sorted(self.branch_at.values(), reverse=True)
        #: the number of stages two or more tasks reach (the second-highest branch depth; 0 for one task)
        self.shared_depth: int = depths[1] if len(depths) > 1 else 0
        self._lowest = depths[-1]

    def _branches(self, branch_at: Mapping[str, int] | None, depth: int) -> dict[str, int]:
        owner = type(self).__name__
        if branch_at is not None and not isinstance(branch_at, Mapping):
            raise ValueError(f"{owner} branch_at must be a mapping {{task: layer}}, got {branch_at!r}.")
        given = dict(branch_at or {})
        unknown = [t for t in given if t not in self.task_names]
        if unknown:
            raise ValueError(
                f"{owner} branch_at names unknown tasks {unknown!r}; tasks are {list(self.task_names)!r}."
            )
        for t, layer in given.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth:
                raise ValueError(
                    f"{owner} branch_at[{t!r}] must be a stage index in 1..{depth} (the head reads that stage's "
                    f"output), got {layer!r}."
                )
        return {t: given.get(t, depth) for t in self.task_names}

    def shared_modules(self) -> list[nn.Module]:
        return list(self.stages[: self.shared_depth])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features: dict[int, Tensor] = {}
        h = x
        for layer, stage in enumerate(self.stages, start=1):
            h = stage(h)
            if layer == self._lowest:
                h = self.mark(h)
            features[layer] = h
        return {t: self.heads[t](features[self.branch_at[t]]) for t in self.task_names}


# ---------------------------------------------------------------------------------------------- MultiBackbone
class MultiBackbone(MultiTaskArchitecture):
    """Several backbones in parallel on the same input, their features concatenated and fed to every task head.

    The MBMT-Net design: Ciubotariu & Czibula, "MBMT-Net: A Multi-Task Learning Based Convolutional Neural Network
    Architecture for Dense Prediction Tasks", IEEE Access, 2022 (doi:10.1109/ACCESS.2022.3225746). ``z = concat(B_1(x), …, B_B(x))`` along the
    channel / feature dimension (dim 1), ``y_t = head_t(z)``. What is verified of the paper is that much (parallel,
    possibly heterogeneous, pretrained backbones whose outputs are concatenated for the heads); which scales are
    concatenated and any projection after the concatenation are not reproduced.

    **Spatial sizes.** Backbones with different output strides give feature maps of different sizes: they are
    resized to a common size before the concatenation, ``resize="smallest"`` (default: adaptive average pooling
    to the smallest height and width) or ``"largest"`` (bilinear upsampling to the largest). This is our choice,
    not the paper's. Features must all be vectors ``(N, C)`` or all maps ``(N, C, H, W)``.

    **Shared.** All backbones (every head reads all of ``z``); the heads are task-specific. ``z`` is the marked
    shared representation (``mode="representation"``).

    Args:
        tasks: task names, in order.
        backbones: the backbones, as modules or factories (``None``: ``num_backbones`` default trunks from
            ``in_features`` / ``in_channels`` and ``widths``, independently initialised).
        heads: ``{task: module or factory}`` or a factory called with the task name; ``None``: a linear head per
            task on the concatenated features (:class:`PooledLinear`).
        num_backbones: how many default backbones (default 2; only without ``backbones``).
        in_features, in_channels, widths: as :class:`HardSharing` (the stages of one default backbone).
        feature_widths: with the user's backbones, each one's output width, needed only by the default heads.
        out_features: the default heads' output size (one int, or ``{task: int}``).
        resize: ``"smallest"`` or ``"largest"`` (see above).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        backbones: Sequence[ModuleSpec] | None = None,
        heads: HeadsSpec = None,
        *,
        num_backbones: int = 2,
        in_features: int | None = None,
        in_channels: int | None = None,
        widths: Sequence[int] | None = None,
        feature_widths: Sequence[int] | None = None,
        out_features: int | Mapping[str, int] = 1,
        resize: str = "smallest",
    ) -> None:
        super().__init__(tasks)
        owner = type(self).__name__
        if resize not in ("smallest", "largest"):
            raise ValueError(f"{owner} resize must be 'smallest' or 'largest', got {resize!r}.")
        self.resize = resize
        if backbones is None:
            count = positive_int(owner, "num_backbones", num_backbones)
            built = []
            for _ in range(count):
                stages, ws = default_stages(owner, in_features, in_channels, widths)
                built.append(nn.Sequential(*stages))
            width: int | None = ws[-1] * count
        else:
            specs = user_stages(owner, "backbones", backbones)
            built = [build_module(owner, f"backbones[{i}]", s) for i, s in enumerate(specs)]
            fws = check_widths(owner, feature_widths, "feature_widths")
            if fws is not None and len(fws) != len(built):
                raise ValueError(
                    f"{owner} feature_widths must give one width per backbone ({len(built)}), got {fws!r}."
                )
            width = None if fws is None else sum(fws)
        if len({id(b) for b in built}) != len(built):
            raise ValueError(
                f"{owner} backbones: the same module object is given twice; pass distinct modules."
            )
        self.backbones = nn.ModuleList(built)
        self.heads = build_heads(
            owner, self.task_names, heads, dict.fromkeys(self.task_names, width), out_features
        )

    def shared_modules(self) -> list[nn.Module]:
        return list(self.backbones)

    def features(self, x: Tensor) -> Tensor:
        """The concatenated backbone features (resized to a common spatial size when they are maps)."""
        feats = [b(x) for b in self.backbones]
        dims = {f.dim() for f in feats}
        if len(dims) != 1:
            raise ValueError(
                f"{type(self).__name__}: the backbones return tensors of different ranks "
                f"{[tuple(f.shape) for f in feats]}; all must be vectors (N, C) or all maps (N, C, H, W)."
            )
        if feats[0].dim() == 4:
            sizes = [tuple(f.shape[-2:]) for f in feats]
            if len(set(sizes)) > 1:
                if self.resize == "smallest":
                    target = (min(s[0] for s in sizes), min(s[1] for s in sizes))
                    feats = [
                        f if tuple(f.shape[-2:]) == target else F.adaptive_avg_pool2d(f, target)
                        for f in feats
                    ]
                else:
                    target = (max(s[0] for s in sizes), max(s[1] for s in sizes))
                    feats = [
                        f
                        if tuple(f.shape[-2:]) == target
                        else F.interpolate(f, size=target, mode="bilinear", align_corners=False)
                        for f in feats
                    ]
        return torch.cat(feats, dim=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.mark(self.features(x))
        return {t: self.heads[t](z) for t in self.task_names}
