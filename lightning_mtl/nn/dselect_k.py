"""DSelect-k: a multi-gate mixture of experts whose gates select at most ``k`` experts each, differentiably.

:func:`smooth_step` and :func:`selector_outputs` are the math, :class:`DSelectKGate` one task's gate (static or
per example) and :func:`dselect_k_regularizer` its auxiliary loss; :class:`DSelectK` is the architecture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_mtl.nn.base import MultiTaskArchitecture
from lightning_mtl.nn.experts import (
    _MIXTURE_REASON,
    Experts,
    InputShape,
    Towers,
    _build_experts,
    _build_towers,
    _default_expert,
    _flat_size,
    _input_shape,
    _is_module_sequence,
    _mix,
    _positive_int,
    _widths,
)

__all__ = [
    "DSelectK",
    "DSelectKGate",
    "binary_codes",
    "dselect_k_regularizer",
    "selector_outputs",
    "smooth_step",
]

#: the constant inside the entropy's log (official code: EPSILON = 1e-6)
ENTROPY_EPS = 1e-6


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """The cubic smooth step: 0 for ``t ≤ −γ/2``, 1 for ``t ≥ γ/2``, ``−2t³/γ³ + 3t/(2γ) + 1/2`` in between
    (continuously differentiable: the derivative ``3/(2γ) − 6t²/γ³`` is 0 at ``±γ/2``)."""
    inner = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(
        t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), inner)
    )


def binary_codes(num_experts: int) -> Tensor:
    """``[n, m]`` booleans, row ``i`` = the ``m = ⌈log₂ n⌉``-bit binary code of ``i``, most significant bit first."""
    m = max(1, math.ceil(math.log2(num_experts)))
    shifts = torch.arange(m - 1, -1, -1)
    return (torch.arange(num_experts).unsqueeze(1) >> shifts) & 1 == 1


def selector_outputs(z: Tensor, codes: Tensor, gamma: float = 1.0) -> Tensor:
    """The single-expert selectors ``r(z)_i = Π_l (S(z_l) if bit_l(i) else 1 − S(z_l))`` for ``z`` ``[..., k, m]``
    and ``codes`` ``[n, m]``: ``[..., k, n]``. Each row sums to 1 when ``n = 2^m``, to at most 1 otherwise (the
    mass of the unreachable codes ``n..2^m−1`` is lost)."""
    s = smooth_step(z, gamma).unsqueeze(-2)  # [..., k, 1, m]
    return torch.where(codes, s, 1 - s).prod(-1)


def dselect_k_regularizer(selectors: Tensor, num_experts: int, entropy_reg: float = 1e-6) -> Tensor:
    """One gate's auxiliary loss from its selectors ``[B, k, n]`` (per example) or ``[k, n]`` (static):
    ``λ Σ_i H(r^{(i)})`` with ``H(r) = −Σ_j r_j log(r_j + 1e-6)``, plus, when ``n`` is not a power of 2,
    ``Σ_i (1 / Σ_j r^{(i)}_j − 1)`` (unweighted) so that the unreachable codes cannot take a selector's mass.
    Per-example terms are averaged over the batch."""
    entropy = -(selectors * torch.log(selectors + ENTROPY_EPS)).sum((-2, -1))
    loss = entropy_reg * entropy
    if num_experts & (num_experts - 1):  # not a power of 2
        reachable = selectors.sum(-1).clamp_min(ENTROPY_EPS)
        loss = loss + (1 / reachable - 1).sum(-1)
    return loss.mean() if loss.dim() else loss


class DSelectKGate(nn.Module):
    """One task's DSelect-k gate over ``n`` experts with ``k`` single-expert selectors.

    Static (``in_features=None``): ``z ∈ ℝ^{k×m}`` and ``w ∈ ℝ^k`` are parameters. Per example: ``z = Linear(x)``
    (``k·m`` outputs) and ``w = Linear(x)`` (``k`` outputs). Weights ``q = Σ_i softmax(w)_i r(z^{(i)})``.
    Initialisation as in the official code: ``z`` (weights and bias) ``~ U(−γ/100, γ/100)``, ``w ~ U(−0.05, 0.05)``.

    ``forward(x)`` returns ``(q, r)``: ``q`` ``[B, n]`` (per example) or ``[n]`` (static), the selectors ``r``
    ``[B, k, n]`` or ``[k, n]``.
    """

    codes: Tensor

    def __init__(
        self, num_experts: int, k: int, *, in_features: int | None = None, gamma: float = 1.0
    ) -> None:
        super().__init__()
        self.num_experts, self.k, self.gamma = num_experts, k, gamma
        self.num_binary = max(1, math.ceil(math.log2(num_experts)))
        self.register_buffer("codes", binary_codes(num_experts), persistent=False)
        self.per_example = in_features is not None
        self.z_logits: nn.Module | nn.Parameter
        self.w_logits: nn.Module | nn.Parameter
        if in_features is None:
            self.z_logits = nn.Parameter(torch.empty(k, self.num_binary).uniform_(-gamma / 100, gamma / 100))
            self.w_logits = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))
        else:
            self.z_logits = nn.Linear(in_features, k * self.num_binary)
            self.w_logits = nn.Linear(in_features, k)
            for p in self.z_logits.parameters():
                nn.init.uniform_(p, -gamma / 100, gamma / 100)
            for p in self.w_logits.parameters():
                nn.init.uniform_(p, -0.05, 0.05)

    def forward(self, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.per_example:
            if x is None:
                raise ValueError("a per-example DSelectKGate needs the routing input x, got None.")
            flat = x.flatten(1)
            z = self.z_logits(flat).reshape(-1, self.k, self.num_binary)  # type: ignore[operator]
            w = torch.softmax(self.w_logits(flat), dim=-1)  # type: ignore[operator]
        else:
            z, w = self.z_logits, torch.softmax(self.w_logits, dim=-1)  # type: ignore[arg-type]
        r = selector_outputs(z, self.codes, self.gamma)  # type: ignore[arg-type]
        return (w.unsqueeze(-1) * r).sum(-2), r


class DSelectK(MultiTaskArchitecture):
    """DSelect-k mixture of experts: ``n`` shared experts, one sparse differentiable gate per task.

    Hussein Hazimeh, Zhe Zhao, Aakanksha Chowdhery, Maheswaran Sathiamoorthy, Yihua Chen, Rahul Mazumder,
    Lichan Hong, Ed H. Chi, "DSelect-k: Differentiable Selection in the Mixture of Experts with Applications to
    Multi-Task Learning", NeurIPS 2021 (arXiv:2106.03760); official code:
    github.com/google-research/google-research/tree/master/dselect_k_moe.

    With ``m = ⌈log₂ n⌉``, a single-expert selector ``z ∈ ℝ^m`` gives ``r(z)_i = Π_l S(z_l)^{b_l(i)}
    (1 − S(z_l))^{1 − b_l(i)}`` (``b(i)`` the binary code of ``i``, MSB first; ``S`` the :func:`smooth_step`
    with width ``γ``); task ``t``'s weights are ``q^t = Σ_{i ≤ k} softmax(w^t)_i r(z^{t,(i)})`` and
    ``y_t = tower_t(Σ_j q^t_j f_j(x))``. Once every ``|z_l| ≥ γ/2`` each selector is one-hot, so at most ``k``
    experts get non-zero weight. ``q^t`` sums to 1 when ``n`` is a power of 2; otherwise the unreachable codes
    hold the missing mass until the auxiliary term below drives it to 0.

    **The auxiliary loss** (:attr:`aux_losses`, one per task, recomputed at every forward; never backpropagated
    here): ``λ Σ_i H(r(z^{t,(i)}))`` (entropy, pushes the selectors to one-hot) plus, when ``n`` is not a power of
    2, ``Σ_i (1/Σ_j r(z^{t,(i)})_j − 1)``. Add it to the task's loss — it involves only that task's gate::

        out = self.arch(x)
        losses = {t: F.mse_loss(out[t], y[t]) + self.arch.aux_losses[t] for t in self.task_names}

    Defaults: ``γ = 1``, ``λ = 1e-6`` and the initialisation are the official code's; ``k`` has no default (the
    user's sparsity budget). Experts and towers default as in :class:`~lightning_mtl.nn.experts.MMoE` (8 experts
    with one hidden layer of 16; towers with one hidden layer of 8 — not the paper's sizes). Conventions that
    differ from the official code: per-example terms are averaged over the batch (the code sums them, which makes
    the regulariser scale with the batch size and with the number of DDP ranks); the power-of-2 term has ``−1``
    per selector so it is 0, not ``k``, once satisfied (same gradient; loss-based strategies see no constant);
    its denominator is clamped at 1e-6 (the code divides by a sum that can reach 0).

    Shared parameters: the experts. Task-specific: the gates and towers. ``mode="representation"`` is not
    supported (each tower reads its own mixture).

    Args:
        tasks: the task names, in order.
        input_shape: one example's shape, ``d`` or ``(C, H, W)``; per-example gates read it flattened.
        k: selectors per task (at most ``k`` experts per task at convergence), ``1 ≤ k ≤ n``.
        num_experts: ``n ≥ 2`` (``None``: 8, or the length of ``experts``).
        experts, expert_hidden, expert_out_features, towers, tower_hidden, out_features: as in
            :class:`~lightning_mtl.nn.experts.MMoE`.
        per_example: per-example gates (default) or static gates (one weight vector per task).
        gamma: the smooth step's width ``γ > 0``.
        entropy_reg: ``λ ≥ 0``.

    Attributes:
        last_gates: ``{task: q}`` of the last forward (detached), ``[B, n]`` or ``[n]`` for static gates.
        aux_losses: ``{task: scalar}`` of the last forward (in the graph).

    Example::

        arch = DSelectK(["ctr", "cvr"], input_shape=32, k=2, num_experts=8)
        out = arch(torch.randn(5, 32))                  # {"ctr": [5, 1], "cvr": [5, 1]}
        (arch.last_gates["ctr"] > 0).sum(-1)            # 8 at first; at most k = 2 once the selectors saturate
    """

    representation_unsupported = _MIXTURE_REASON.format(name="DSelectK")

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: InputShape,
        *,
        k: int,
        num_experts: int | None = None,
        experts: Experts = None,
        expert_hidden: Sequence[int] = (16,),
        expert_out_features: int | None = None,
        towers: Towers = None,
        tower_hidden: Sequence[int] = (8,),
        out_features: int | Mapping[str, int] = 1,
        per_example: bool = True,
        gamma: float = 1.0,
        entropy_reg: float = 1e-6,
    ) -> None:
        super().__init__(tasks)
        name = type(self).__name__
        shape = _input_shape(name, input_shape)
        hidden = _widths(name, "expert_hidden", expert_hidden)
        if (
            isinstance(gamma, bool)
            or not isinstance(gamma, (int, float))
            or not math.isfinite(gamma)
            or gamma <= 0
        ):
            raise ValueError(
                f"{name} gamma (the smooth step's width) must be a finite number > 0, got {gamma!r}."
            )
        if (
            isinstance(entropy_reg, bool)
            or not isinstance(entropy_reg, (int, float))
            or not math.isfinite(entropy_reg)
            or entropy_reg < 0
        ):
            raise ValueError(f"{name} entropy_reg (λ) must be a finite number >= 0, got {entropy_reg!r}.")
        if not isinstance(per_example, bool):
            raise ValueError(f"{name} per_example must be True or False, got {per_example!r}.")
        if num_experts is None and not _is_module_sequence(experts):
            num_experts = 8
        self.experts = _build_experts(name, experts, num_experts, lambda: _default_expert(shape, hidden))
        self.num_experts = len(self.experts)
        if self.num_experts < 2:
            raise ValueError(f"{name} needs num_experts >= 2 to select among, got {self.num_experts}.")
        self.k = _positive_int(name, "k", k)
        if self.k > self.num_experts:
            raise ValueError(
                f"{name} k (experts selected per task) must be at most num_experts={self.num_experts}, got {k}."
            )
        self.gamma, self.entropy_reg, self.per_example = float(gamma), float(entropy_reg), per_example
        self.in_features = math.prod(shape)
        self.gates = nn.ModuleDict(
            {
                t: DSelectKGate(
                    self.num_experts,
                    self.k,
                    in_features=self.in_features if per_example else None,
                    gamma=gamma,
                )
                for t in self.task_names
            }
        )
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
        self.aux_losses: dict[str, Tensor] = {}

    def shared_modules(self) -> list[nn.Module]:
        return [self.experts]

    def auxiliary_loss(self) -> Tensor:
        """The sum of :attr:`aux_losses` over tasks (for a user who adds one regulariser to the total loss)."""
        if not self.aux_losses:
            raise RuntimeError("DSelectK.auxiliary_loss() is computed by forward(); call the model first.")
        return torch.stack(list(self.aux_losses.values())).sum()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        flat = _flat_size(type(self).__name__, x, self.in_features, "the input")
        outputs = torch.stack([expert(x) for expert in self.experts])  # [n, B, ...]
        result, gates, aux = {}, {}, {}
        for t in self.task_names:
            q, r = self.gates[t](flat)
            gates[t] = q.detach()
            aux[t] = dselect_k_regularizer(r, self.num_experts, self.entropy_reg)
            result[t] = self.towers[t](_mix(q, outputs))
        self.last_gates, self.aux_losses = gates, aux
        return result
