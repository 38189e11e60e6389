"""MTAN: a shared backbone and, per task, soft attention modules over every stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl.nn.base import MultiTaskArchitecture, default_conv_stack, default_mlp
from lightning_mtl.nn.hard_sharing import (
    DEFAULT_CHANNELS,
    DEFAULT_HIDDEN,
    HeadsSpec,
    ModuleSpec,
    build_heads,
    build_module,
    check_widths,
    positive_int,
)

__all__ = ["MTAN"]

StageSpec = nn.Sequential | tuple[ModuleSpec, ModuleSpec] | list[ModuleSpec]


def _attention(in_ch: int, hidden: int, out_ch: int, spatial: bool) -> nn.Sequential:
    """g: 1×1 conv → BN → ReLU → 1×1 conv → BN → sigmoid (Linear / BatchNorm1d for vector features)."""
    if spatial:
        return nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, out_ch, 1), nn.BatchNorm2d(out_ch), nn.Sigmoid(),
        )  # fmt: skip
    return nn.Sequential(
        nn.Linear(in_ch, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, out_ch), nn.BatchNorm1d(out_ch), nn.Sigmoid(),
    )  # fmt: skip


def _block(in_ch: int, out_ch: int, spatial: bool) -> nn.Sequential:
    """f: 3×3 conv → BN → ReLU (Linear → BatchNorm1d → ReLU for vector features)."""
    if spatial:
        return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU())
    return nn.Sequential(nn.Linear(in_ch, out_ch), nn.BatchNorm1d(out_ch), nn.ReLU())


def _resize(a: Tensor, like: Tensor) -> Tensor:
    """``a`` at ``like``'s spatial size: max-pooled down (the paper's encoder) or bilinearly upsampled."""
    if a.dim() < 4 or a.shape[-2:] == like.shape[-2:]:
        return a
    size = tuple(like.shape[-2:])
    if size[0] <= a.shape[-2] and size[1] <= a.shape[-1]:
        return F.adaptive_max_pool2d(a, size)
    return F.interpolate(a, size=size, mode="bilinear", align_corners=False)


class MTAN(MultiTaskArchitecture):
    """Multi-Task Attention Network: a shared backbone, and per task a soft attention module over every stage that
    selects the task's features from the shared ones.

    Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019. Each backbone stage ``j`` is
    split into a first part ``u^j`` and its last block ``p^j`` (as LibMTL's ResNet variant: ``layer[:-1]`` and
    ``layer[-1]``). Task ``t``'s attention mask is ``a_t^j = g_t^j([u^j ; f^{j−1}(â_t^{j−1})])`` (channel concat;
    ``a_t^1 = g_t^1(u^1)``), its features ``â_t^j = a_t^j ⊙ p^j``, with ``g`` = 1×1 conv → BN → ReLU → 1×1 conv →
    BN → sigmoid (masks in (0, 1)) and ``f^j`` = 3×3 conv → BN → ReLU between stages, then max-pooled to the next
    stage's resolution (bilinearly upsampled if it is larger). Task ``t``'s head reads ``â_t^J``.

    Choices: ``f^j`` is one module per stage shared by the tasks, as in the official code (lorenmt/mtan,
    ``model_segnet_mtan.py``: ``encoder_block_att``; whether the paper shares it is unverified); ``g``'s hidden width
    is the stage's output width (the official ``att_layer([2c, c, c])``); PyTorch's default initialisation (the
    official code uses Xavier-normal convs).
    ``T`` separate attention modules per stage are built (LibMTL's ResNet MTAN builds ``[module] * T``, one object
    for every task, so nothing there is task-specific). The official SegNet (filters 64-128-256-512-512, attention in
    5 encoder and 5 decoder stages, Adam 1e-4) is not reproduced: the stages are the user's or small defaults.

    **Input.** Conv backbones (stage outputs ``(N, C, H, W)``). Vector features ``(N, C)`` are supported too: the
    1×1 convs become linear layers, BatchNorm1d, and ``f`` a linear block (the defaults for ``in_features``; pass
    ``spatial=False`` with the user's vector stages).

    **Shared.** The backbone stages (``u``, ``p``) and the ``f`` blocks (every task reads them); the attention
    modules and heads are task-specific, and each task's attention gets gradient only from its own output. LibMTL
    counts only the backbone as shared, although its ``f`` blocks are reached by every task. Each task reads its
    own masked features, so ``mode="representation"`` is refused (:attr:`representation_unsupported`).

    Args:
        tasks: task names, in order.
        stages: the backbone's stages; each an ``nn.Sequential`` of two or more modules (split into ``[:-1]`` and
            ``[-1]``) or a pair ``(u, p)`` of modules or factories. ``None``: default stages from ``in_channels``
            (``u``: 3×3 conv, BN, ReLU, 2× max-pool; ``p``: 3×3 conv, BN, ReLU) or ``in_features`` (Linear + ReLU
            each).
        heads: ``{task: module or factory}`` or a factory called with the task name; ``None``: a linear head per
            task on its attended features.
        widths: the default stages' widths (default ``(32, 64)`` conv, ``(64, 64)`` MLP), or, with the user's
            stages (required then), each stage's output channels: an int when ``u`` and ``p`` output the same
            number, else a pair ``(channels of u, channels of p)``.
        in_features, in_channels: vector / image input for the default stages.
        out_features: the default heads' output size (one int, or ``{task: int}``).
        spatial: with the user's stages: ``True`` for feature maps, ``False`` for vectors.

    Example::

        arch = MTAN(["seg", "depth"], in_channels=3, widths=(16, 32))
        masks = arch.attention_masks(torch.randn(2, 3, 32, 32))  # {task: [mask per stage]}
    """

    representation_unsupported = (
        "each MTAN task head reads its own attention-masked features; no single tensor feeds every task."
    )

    def __init__(
        self,
        tasks: Sequence[str],
        stages: Sequence[StageSpec] | None = None,
        heads: HeadsSpec = None,
        *,
        widths: Sequence[int | tuple[int, int]] | None = None,
        in_features: int | None = None,
        in_channels: int | None = None,
        out_features: int | Mapping[str, int] = 1,
        spatial: bool = True,
    ) -> None:
        super().__init__(tasks)
        owner = type(self).__name__
        if stages is None:
            firsts, lasts, channels, spatial = self._defaults(in_features, in_channels, widths)
        else:
            firsts, lasts, channels = self._user(stages, widths)
        self.spatial = bool(spatial)
        self.firsts = nn.ModuleList(firsts)  # u^j
        self.lasts = nn.ModuleList(lasts)  # p^j
        # f^j: from p^j's channels to u^{j+1}'s, shared by the tasks
        self.blocks = nn.ModuleList(
            _block(channels[j][1], channels[j + 1][0], self.spatial) for j in range(len(channels) - 1)
        )
        self.attention = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    _attention(cu if j == 0 else 2 * cu, cp, cp, self.spatial)
                    for j, (cu, cp) in enumerate(channels)
                )
                for t in self.task_names
            }
        )
        self.heads = build_heads(
            owner, self.task_names, heads, dict.fromkeys(self.task_names, channels[-1][1]), out_features
        )

    def _defaults(
        self, in_features: int | None, in_channels: int | None, widths: Sequence[object] | None
    ) -> tuple[list[nn.Module], list[nn.Module], list[tuple[int, int]], bool]:
        owner = type(self).__name__
        if (in_features is None) == (in_channels is None):
            raise ValueError(
                f"{owner}: without stages, pass exactly one of in_channels= (conv stages) or in_features= (MLP "
                f"stages), got in_features={in_features!r}, in_channels={in_channels!r}."
            )
        spatial = in_channels is not None
        width = positive_int(owner, "in_channels" if spatial else "in_features", in_channels or in_features)
        ws = check_widths(owner, widths) or list(DEFAULT_CHANNELS if spatial else DEFAULT_HIDDEN)  # type: ignore[arg-type]
        firsts: list[nn.Module] = []
        lasts: list[nn.Module] = []
        for w in ws:
            if spatial:
                firsts.append(default_conv_stack(width, [w]))
                lasts.append(nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()))
            else:
                firsts.append(default_mlp(width, [w]))
                lasts.append(default_mlp(w, [w]))
            width = w
        return firsts, lasts, [(w, w) for w in ws], spatial

    def _user(
        self, stages: Sequence[StageSpec], widths: Sequence[int | tuple[int, int]] | None
    ) -> tuple[list[nn.Module], list[nn.Module], list[tuple[int, int]]]:
        owner = type(self).__name__
        if isinstance(stages, (str, bytes, nn.Module)) or not isinstance(stages, Sequence) or not stages:
            raise ValueError(
                f"{owner} stages must be a non-empty list of stages (each an nn.Sequential or a pair (u, p)), "
                f"got {type(stages).__name__}."
            )
        firsts: list[nn.Module] = []
        lasts: list[nn.Module] = []
        for i, stage in enumerate(stages):
            if isinstance(stage, nn.Sequential):
                if len(stage) < 2:
                    raise ValueError(
                        f"{owner} stages[{i}] is an nn.Sequential of {len(stage)} module(s); it needs two or more "
                        "(split into u = stage[:-1] and p = stage[-1]), or pass a pair (u, p)."
                    )
                firsts.append(stage[:-1])
                lasts.append(stage[-1])
            elif isinstance(stage, (tuple, list)) and len(stage) == 2:
                firsts.append(build_module(owner, f"stages[{i}][0]", stage[0]))
                lasts.append(build_module(owner, f"stages[{i}][1]", stage[1]))
            else:
                raise ValueError(
                    f"{owner} stages[{i}] must be an nn.Sequential of two or more modules or a pair (u, p), got "
                    f"{type(stage).__name__}."
                )
        if widths is None or isinstance(widths, (str, bytes)) or len(widths) != len(firsts):
            raise ValueError(
                f"{owner} needs widths=[...] with the user's stages: one entry per stage ({len(firsts)}), an int "
                f"(u and p output that many channels) or a pair (channels of u, channels of p); got {widths!r}."
            )
        channels: list[tuple[int, int]] = []
        for i, w in enumerate(widths):
            pair = tuple(w) if isinstance(w, (tuple, list)) else (w, w)
            if len(pair) != 2:
                raise ValueError(f"{owner} widths[{i}] must be an int or a pair of ints, got {w!r}.")
            channels.append(
                (positive_int(owner, f"widths[{i}]", pair[0]), positive_int(owner, f"widths[{i}]", pair[1]))
            )
        return firsts, lasts, channels

    # ------------------------------------------------------------------ what is shared
    def shared_modules(self) -> list[nn.Module]:
        return [self.firsts, self.lasts, self.blocks]

    # ------------------------------------------------------------------ forward
    def _run(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
        masks: dict[str, list[Tensor]] = {t: [] for t in self.task_names}
        attended: dict[str, Tensor] = {}
        h = x
        for j, (first, last) in enumerate(zip(self.firsts, self.lasts, strict=True)):
            u = first(h)
            p = last(u)
            for t in self.task_names:
                if j == 0:
                    a = self.attention[t][j](u)
                else:
                    prev = _resize(self.blocks[j - 1](attended[t]), u)
                    a = self.attention[t][j](torch.cat([u, prev], dim=1))
                masks[t].append(a)
                attended[t] = a * p
            h = p
        return {t: self.heads[t](attended[t]) for t in self.task_names}, masks

    def attention_masks(self, x: Tensor) -> dict[str, list[Tensor]]:
        """Each task's attention masks ``a_t^j``, one per stage (values in (0, 1))."""
        return self._run(x)[1]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self._run(x)[0]
