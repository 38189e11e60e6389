"""Cross-stitch networks: one column per task, linear mixing of the columns' activations after every stage."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mtl.nn.base import MultiTaskArchitecture
from lightning_mtl.nn.hard_sharing import (
    HeadsSpec,
    ModuleSpec,
    build_heads,
    build_module,
    check_widths,
    default_stages,
    user_stages,
)

__all__ = ["CrossStitch", "cross_stitch_init"]


def cross_stitch_init(num_tasks: int, alpha_self: float) -> Tensor:
    """The T×T initial mixing matrix: ``alpha_self`` on the diagonal, ``(1 − alpha_self)/(T − 1)`` off it, so every
    row sums to 1 (``[[1]]`` for one task)."""
    if num_tasks == 1:
        return torch.ones(1, 1)
    off = (1.0 - alpha_self) / (num_tasks - 1)
    alpha = torch.full((num_tasks, num_tasks), off)
    alpha.fill_diagonal_(alpha_self)
    return alpha


class CrossStitch(MultiTaskArchitecture):
    """Cross-stitch networks: one column (a copy of the stages) per task, and after every stage a cross-stitch unit
    that feeds column ``t`` the mix ``x̃_t = Σ_s α_ts x_s`` of all columns' activations.

    Misra, Shrivastava, Gupta, Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR 2016. The paper
    stitches two AlexNets after every pooling and fully-connected layer (Fig. 4); here a unit follows every stage
    (so put the stage boundaries where the paper puts its units), and task ``t``'s head reads column ``t``'s last
    mixed output. The mixing is applied at every position (and, with ``per_channel=True``, with its own T×T matrix
    per channel — which granularity the paper used is unverified; one matrix per unit is the default).

    **Initialisation.** The paper initialises α with ``α_S`` on the diagonal and ``α_D`` off it (two tasks, values
    in [0, 1], ablating pairs such as (0.9, 0.1) and (0.5, 0.5)); for T tasks: ``alpha_self`` on the diagonal and
    ``(1 − alpha_self)/(T − 1)`` off it, so each row sums to 1 and the unit mixes rather than sums (LibMTL and the
    MTAN repository initialise α to all ones, which multiplies the activations by about T per unit).
    ``alpha_self = 0.9`` by default. With ``alpha_self = 1`` (α = I) the network is T independent single-task
    networks. Columns built from the same module (deep copies) start identical, as the paper's copies of one
    pretrained network; factories give independently initialised columns.

    **Learning rate.** The paper trains α with a learning rate scaled up from the network's (its ablation goes up to
    about 10³; the value it settles on is unverified here). :meth:`alpha_parameters` returns the α tensors and
    :meth:`param_groups` builds optimizer groups with ``alpha_lr_mult`` and no weight decay on α.

    **Shared.** Every column's parameters and every α: at a generic α, each task's output depends on all columns
    through the units (the last unit's α reaches task ``t`` through its row ``t`` — the tensor as a whole is reached
    by every task). LibMTL counts the same set as shared. There is no single tensor that every head reads, so
    ``mode="representation"`` is refused (:attr:`representation_unsupported`). Memory and compute: T× the stages.

    Args:
        tasks: task names, in order.
        stages: the stages of one column, as modules (deep-copied into every column) or factories (called once per
            column); ``None``: the defaults from ``in_features`` / ``in_channels`` (see :class:`HardSharing`).
        heads: ``{task: module or factory}`` or a factory called with the task name; ``None``: a linear head per
            task on its column's output.
        in_features, in_channels: vector / image input for the default stages.
        widths: the default stages' widths, or the user's stages' output widths (needed by the default heads and
            by ``per_channel``).
        out_features: the default heads' output size (one int, or ``{task: int}``).
        alpha_self: the diagonal of the initial α, in [0, 1] (default 0.9).
        per_channel: one T×T matrix per channel of each stage's output instead of one per unit.

    Example::

        arch = CrossStitch(["seg", "depth"], in_channels=3, widths=(16, 32))
        opt = torch.optim.SGD(arch.param_groups(lr=1e-3, alpha_lr_mult=100.0), lr=1e-3)
    """

    representation_unsupported = "each cross-stitch task head reads its own column's mixed features; no single tensor feeds every task."

    def __init__(
        self,
        tasks: Sequence[str],
        stages: Sequence[ModuleSpec] | None = None,
        heads: HeadsSpec = None,
        *,
        in_features: int | None = None,
        in_channels: int | None = None,
        widths: Sequence[int] | None = None,
        out_features: int | Mapping[str, int] = 1,
        alpha_self: float = 0.9,
        per_channel: bool = False,
    ) -> None:
        super().__init__(tasks)
        owner = type(self).__name__
        if (
            isinstance(alpha_self, bool)
            or not isinstance(alpha_self, (int, float))
            or not 0.0 <= alpha_self <= 1.0
        ):
            raise ValueError(
                f"{owner} alpha_self must be a number in [0, 1] (the paper: 0.9), got {alpha_self!r}."
            )
        num = len(self.task_names)
        if stages is None:
            template, stage_widths = default_stages(owner, in_features, in_channels, widths)
            columns = [[copy.deepcopy(m) for m in template] for _ in range(num)]
        else:
            specs = user_stages(owner, "stages", stages)
            stage_widths = check_widths(owner, widths)  # type: ignore[assignment]
            if stage_widths is not None and len(stage_widths) != len(specs):
                raise ValueError(
                    f"{owner} widths must give one output width per stage ({len(specs)}), got {stage_widths!r}."
                )
            columns = [
                [
                    copy.deepcopy(s) if isinstance(s, nn.Module) else build_module(owner, f"stages[{i}]", s)
                    for i, s in enumerate(specs)
                ]
                for _ in range(num)
            ]
        if per_channel and stage_widths is None:
            raise ValueError(
                f"{owner} per_channel=True needs each stage's output channels: pass widths=[...] with the stages."
            )
        self.per_channel = bool(per_channel)
        self.alpha_self = float(alpha_self)
        self.columns = nn.ModuleList(nn.ModuleList(column) for column in columns)
        init = cross_stitch_init(num, self.alpha_self)
        self.alphas = nn.ParameterList(
            nn.Parameter(init.repeat(stage_widths[i], 1, 1) if self.per_channel else init.clone())  # type: ignore[index]
            for i in range(len(columns[0]))
        )
        last = None if stage_widths is None else stage_widths[-1]
        self.heads = build_heads(
            owner, self.task_names, heads, dict.fromkeys(self.task_names, last), out_features
        )

    # ------------------------------------------------------------------ what is shared
    def shared_modules(self) -> list[nn.Module]:
        return [self.columns, self.alphas]

    def alpha_parameters(self) -> list[nn.Parameter]:
        """The cross-stitch units' α, one tensor per stage: ``(T, T)``, or ``(C, T, T)`` with ``per_channel``."""
        return list(self.alphas)

    def param_groups(
        self, lr: float, alpha_lr_mult: float = 1.0, weight_decay: float = 0.0
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups: everything but α at ``lr`` and ``weight_decay``; α at ``lr · alpha_lr_mult``
        with no weight decay (the paper scales α's learning rate up)."""
        for name, value in (("lr", lr), ("alpha_lr_mult", alpha_lr_mult)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(
                    f"{type(self).__name__}.param_groups {name} must be a positive number, got {value!r}."
                )
        alpha_ids = {id(p) for p in self.alphas}
        rest = [p for p in self.parameters() if id(p) not in alpha_ids]
        return [
            {"params": rest, "lr": lr, "weight_decay": weight_decay},
            {"params": list(self.alphas), "lr": lr * alpha_lr_mult, "weight_decay": 0.0},
        ]

    # ------------------------------------------------------------------ forward
    def stitch(self, activations: Tensor, alpha: Tensor) -> Tensor:
        """One cross-stitch unit: ``activations`` ``(T, N, C, …)`` (column-major) mixed by ``alpha``."""
        if alpha.dim() == 2:
            return torch.einsum("ts,s...->t...", alpha, activations)
        t, n, c = activations.shape[:3]
        mixed = torch.einsum("cts,sncr->tncr", alpha, activations.reshape(t, n, c, -1))
        return mixed.reshape(activations.shape)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        xs = [x] * len(self.task_names)
        for i, alpha in enumerate(self.alphas):
            ys = torch.stack([column[i](h) for column, h in zip(self.columns, xs, strict=True)])
            xs = list(self.stitch(ys, alpha).unbind(0))
        return {t: self.heads[t](h) for t, h in zip(self.task_names, xs, strict=True)}
