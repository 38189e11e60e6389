"""GradNorm (Chen et al. 2018): learn task weights that balance the tasks' gradient norms.

Long because one strategy owns four intertwined pieces of state that must agree at every window: the normalised
layer (resolved per model, sharded or not), the learned weights and their optimizer, the initial losses ``L(0)``
recorded per task under partial labels, and the window's gradient norms; splitting them would spread the
window's invariants over several files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_mtl.functional.gradnorm import (
    gradnorm_objective,
    gradnorm_weight_grad,
    inverse_training_rates,
    renormalize_weights,
)
from lightning_mtl.gradients import JacobianMethod, TaskGradients, gramian
from lightning_mtl.step import StepContext
from lightning_mtl.strategies._gradient_based import _window_presence
from lightning_mtl.strategies._learnable import LearnableParameters, OptimizerChoice
from lightning_mtl.strategies.base import MTLStrategy
from lightning_mtl.task_state import take_tasks

#: how the last shared layer is named: a parameter name or module path of the LightningModule, or a
#: callable ``module -> parameter(s)``; ``None`` picks a default (see :class:`GradNorm`).
LayerSpec = str | Callable[[nn.Module], nn.Parameter | Iterable[nn.Parameter]] | None


class GradNorm(MTLStrategy):
    """GradNorm: Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018 (https://arxiv.org/abs/1711.02257), Algorithm 1.

    Learnable task weights ``wᵢ`` (init 1) scale the losses; the network steps on ``Σ wᵢLᵢ`` (one backward
    pass). On the last shared layer ``W``, the weighted gradient norms ``Gᵢ = ‖∇_W wᵢLᵢ‖ = wᵢ‖∇_W Lᵢ‖`` are
    pulled towards ``Ḡ·rᵢ^α``, where ``Ḡ`` is their mean and ``rᵢ = L̃ᵢ / mean L̃`` the relative inverse
    training rate (``L̃ᵢ = Lᵢ(t)/Lᵢ(0)``): the weights alone step on ``L_grad = Σᵢ |Gᵢ − Ḡ·rᵢ^α|`` with the
    target held constant, then are clamped positive and renormalised to ``Σwᵢ = T``. A task that trains
    slower than the others (larger ``rᵢ``) gets a larger gradient; ``α = 0`` just equalises the norms.

    Because ``Gᵢ = wᵢnᵢ`` with ``nᵢ = ‖∇_W Lᵢ‖``, the weights' gradient ``sign(Gᵢ − Ḡrᵢ^α)·nᵢ`` needs only the
    norms, not a second-order graph: the per-task gradients of ``W`` come from ``torch.autograd.grad`` (no
    DDP hook fires), are averaged over the micro-batches of an accumulation window and over ranks (one
    reduction of a ``T × |W|`` matrix per optimizer step) and the losses are the rank-averaged ones. So
    under DDP, R ranks with batch B give the same weights and parameters as one process with batch R·B.
    ``L_grad`` never reaches the network, and ``w`` gets no gradient from ``Σ wᵢLᵢ``. Under 16-bit AMP the
    per-task gradients are computed on the loss times the GradScaler's scale (then unscaled), and a step the
    scaler skips does not update ``w``.

    Partial labels: in a step (an accumulation window) where some tasks are labelled on no rank, GradNorm runs
    on the present tasks ``P`` only. The network steps on ``Σ_P wᵢLᵢ`` with the learned weights as they are
    (not rescaled); ``Ḡ`` and the mean of ``L̃`` in ``rᵢ`` are taken over ``P`` (the paper's objective for the
    task set ``P``), only ``w_P`` gets a gradient, and the private optimizer steps only those entries (the
    absent tasks' values and Adam moments are restored bit-for-bit; Adam's step count, shared by all entries,
    counts the step). The renormalisation keeps ``Σ w = T``: the present weights are clamped and rescaled to
    the sum ``T − Σ_absent wᵢ`` they had before the step, so the absent weights are untouched. ``Lᵢ(0)`` is
    recorded from the first ``initial_loss_steps`` steps in which task ``i`` is labelled (a task absent at the
    start gets its ``Lᵢ(0)`` when it first appears). An absent task's logged weight is 0 for that step, and
    its ``grad_norm``/``inverse_rate`` are not logged.

    Args:
        alpha: the asymmetry α ≥ 0 (paper: 1.5 on NYUv2, 0.12 on its synthetic toy; results insensitive in
            (0, 3) per the paper). Default 1.5.
        layer: the last shared layer ``W`` whose gradients are normalised. A parameter name of the module
            (``"encoder.4.weight"``), a sub-module path (``"encoder.4"``: all its trainable parameters,
            concatenated), or a callable ``module -> parameter | iterable of parameters``. Default ``None``:
            the last trainable parameter with at least 2 dimensions among
            :meth:`~lightning_mtl.MultiTaskModule.shared_parameters` (the weight matrix or kernel of the last
            shared linear/conv layer, as in the paper), else the last trainable shared parameter.
        lr: learning rate of the weights' private optimizer. The paper does not state one; ports use 1e-4
            to 2.5e-2 with Adam. Default ``0.025`` (weights of order 1 adapt within ~100 steps); ``None``
            follows the model's learning rate (as LibMTL, which puts ``w`` into the model's optimizer).
        optimizer: ``"adam"`` (default; its step does not depend on the arbitrary scale of the gradient
            norms), ``"sgd"`` or ``"match"`` (the model's optimizer class, weight decay 0).
        initial_loss_steps: ``Lᵢ(0)`` is the mean of the rank-averaged losses of the first this many optimizer
            steps (paper: 1, the first batch — fragile with noisy batches). Until then the running mean is used.
        min_weight: weights are clamped to at least this before renormalising (keeps ``w > 0``).
        jacobian: how the ``T`` per-task gradients of ``W`` are computed: ``"auto"`` (one batched backward,
            falling back to a loop of ``T`` passes where ``vmap`` fails), ``"batched"`` or ``"loop"``.
    """

    supports_absent_tasks = True

    def __init__(
        self,
        alpha: float = 1.5,
        layer: LayerSpec = None,
        lr: float | None = 0.025,
        optimizer: OptimizerChoice = "adam",
        initial_loss_steps: int = 1,
        min_weight: float = 1e-6,
        jacobian: JacobianMethod = "auto",
    ) -> None:
        super().__init__()
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)
            or alpha < 0
        ):
            raise ValueError(f"GradNorm alpha must be a finite number >= 0 (paper: 1.5), got {alpha!r}.")
        if not (layer is None or isinstance(layer, str) or callable(layer)):
            raise TypeError(
                "GradNorm layer must be None, a parameter name / module path of the model (str) or a callable "
                f"module -> parameter(s), got {type(layer).__name__} ({layer!r})."
            )
        if isinstance(layer, str) and not layer:
            raise ValueError("GradNorm layer must not be an empty string; pass None for the default layer.")
        if (
            isinstance(initial_loss_steps, bool)
            or not isinstance(initial_loss_steps, int)
            or initial_loss_steps < 1
        ):
            raise ValueError(f"GradNorm initial_loss_steps must be an int >= 1, got {initial_loss_steps!r}.")
        if not (
            isinstance(min_weight, (int, float))
            and not isinstance(min_weight, bool)
            and math.isfinite(min_weight)
            and min_weight > 0
        ):
            raise ValueError(f"GradNorm min_weight must be > 0, got {min_weight!r}.")
        LearnableParameters(torch.zeros(1), optimizer, lr)  # validates optimizer / lr now
        # the per-task gradients of the last shared layer, averaged over the window and over ranks
        self._gradients = TaskGradients("GradNorm", parameters=self._layer, jacobian=jacobian)
        self.alpha = float(alpha)
        self.layer = layer
        self.lr = lr
        self.optimizer = optimizer
        self.initial_loss_steps = initial_loss_steps
        self.min_weight = float(min_weight)
        self._learnable: LearnableParameters | None = None
        self._layer_params: list[nn.Parameter] | None = None
        # L(0): per task, sum and count of the mean losses of the first windows that label it (identical on
        # every rank)
        self._initial_sum: Tensor | None = None
        self._initial_count: Tensor | None = None  # [T] int64
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # (w, nᵢ, rᵢ) of the last window's tasks
        self._last_present: list[int] | None = None  # partial labels: the last window's present tasks
        self._window_present: list[bool] | None = None  # which tasks the current window labels (None: all)
        self._layer_checked: set[int] = set()  # tasks checked to reach the layer (at their first window)

    # ------------------------------------------------------------------ binding
    def bind(self, tasks) -> None:  # noqa: ANN001 - see MTLStrategy.bind
        super().bind(tasks)
        if self._learnable is None or self._learnable.param.numel() != len(self.task_names):
            self._learnable = LearnableParameters(torch.ones(len(self.task_names)), self.optimizer, self.lr)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":  # found on the first step when the module finds its shared parameters then
            automatic = self.layer is None and getattr(pl_module, "finds_shared_parameters", False)
            self._layer_params = None if automatic else self.resolve_layer(pl_module)

    def resolve_layer(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters of the last shared layer ``W`` for ``module`` (see ``layer``)."""
        spec = self.layer
        if spec is None:
            shared_fn = getattr(module, "shared_parameters", None)
            shared = shared_fn() if shared_fn is not None else None
            if shared is None:
                raise ValueError(
                    f"GradNorm needs the last shared layer, but {type(module).__name__}.shared_parameters() "
                    "returns None. Override shared_parameters() to return the encoder's parameters, or pass "
                    "GradNorm(layer='encoder.<last layer>') naming the last shared layer."
                )
            trainable = [p for p in shared if p.requires_grad]
            if not trainable:
                raise ValueError(
                    f"GradNorm: {type(module).__name__}.shared_parameters() has no trainable parameter. Return "
                    "the encoder's parameters from it, or pass GradNorm(layer=...)."
                )
            matrices = [p for p in trainable if p.ndim >= 2]
            return [(matrices or trainable)[-1]]
        if isinstance(spec, str):
            named = dict(module.named_parameters())
            if spec in named:
                params = [named[spec]]
            else:
                try:
                    sub = module.get_submodule(spec)
                except AttributeError:
                    sample = ", ".join(list(named)[-6:])
                    raise ValueError(
                        f"GradNorm layer={spec!r} is neither a parameter name nor a sub-module of "
                        f"{type(module).__name__}. Use a name from model.named_parameters() (e.g. {sample}) or "
                        "a module path such as 'encoder.3'."
                    ) from None
                params = list(sub.parameters())
        else:
            found = spec(module)
            params = [found] if isinstance(found, Tensor) else list(found)
            if not all(isinstance(p, Tensor) for p in params):
                raise TypeError(
                    "GradNorm layer callable must return a parameter or an iterable of parameters, got "
                    f"{[type(p).__name__ for p in params]}."
                )
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError(
                f"GradNorm layer={spec!r} has no trainable parameter (requires_grad=True) in "
                f"{type(module).__name__}. Name the last shared layer's weight."
            )
        return params

    # ------------------------------------------------------------------ the step
    @property
    def params(self) -> Tensor:
        """The learnable weights ``wᵢ`` in task order."""
        assert self._learnable is not None, "GradNorm is not attached to a module yet"
        return self._learnable.param

    def _layer(self, module: nn.Module) -> list[nn.Parameter]:
        # resolved again when the module no longer holds them: a sharded model (FSDP) trains other parameter
        # objects than the ones it was set up with (FSDP2 swaps in DTensors, and unsharded parameters during the
        # forward); a layer frozen during training stays the layer (and is a clear error, not another layer)
        if self._layer_params is not None:
            current = {id(p) for p in module.parameters()}
            if all(id(p) in current for p in self._layer_params):
                return self._layer_params
        self._layer_params = self.resolve_layer(module)
        return self._layer_params

    def backward(self, ctx: StepContext) -> None:
        assert self._learnable is not None
        learn = self._learnable
        learn.prepare(ctx.trainer, ctx.losses.device)
        if ctx.is_window_start:
            self._gradients.reset()
        # partial labels: a task is present in the window when one of its micro-batches labels it
        self._window_present = _window_presence(self._window_present, ctx.present, ctx.is_window_start)
        self._gradients.add(ctx, keep_graph=False)  # before the backward frees the graph
        weights = learn.param.detach().to(ctx.losses.dtype)
        ctx.backward((weights * ctx.losses).sum())
        if ctx.is_sync_step:
            self._close_window(ctx)

    def _layer_norms(self, ctx: StepContext) -> Tensor:
        """``‖∇_W Lᵢ‖`` of the window's global batch on the normalised layer ``W`` (``[T]``)."""
        if self._gradients.sharded:  # FSDP: each rank holds a shard of the layer's gradients; G's diagonal
            return self._gradients.gramian(ctx).diagonal().sqrt().float()
        layer_grads = self._gradients.jacobian(ctx)  # [T, |W|]
        norms = torch.linalg.vector_norm(layer_grads, dim=1)
        if not bool(torch.isfinite(norms).all()) and bool(torch.isfinite(layer_grads).all()):
            norms = gramian(layer_grads).diagonal().sqrt().float()  # finite gradients whose norm overflows
        return norms

    def _close_window(self, ctx: StepContext) -> None:
        assert self._learnable is not None
        norms = self._layer_norms(ctx)
        window_losses = self._gradients.losses  # already rank-averaged
        self._gradients.reset()
        present_mask, self._window_present = self._window_present, None
        T = len(self.task_names)
        present = list(range(T)) if present_mask is None else [i for i in range(T) if present_mask[i]]
        index = torch.tensor(present, dtype=torch.long)
        if self._initial_count is None:
            self._initial_count = torch.zeros(T, dtype=torch.long)
            self._initial_sum = torch.zeros(T, dtype=torch.float64)
        assert self._initial_sum is not None
        recording = [i for i in present if int(self._initial_count[i]) < self.initial_loss_steps]
        if recording:
            values = window_losses.double().cpu()
            bad = {self.task_names[i]: float(values[i]) for i in recording if not float(values[i]) > 0}
            if bad:
                raise ValueError(
                    f"GradNorm needs positive task losses for its loss ratios Lᵢ(t)/Lᵢ(0), got {bad} at the "
                    "start of training. Shift or rescale those losses to be positive (e.g. add a constant), or "
                    "use another strategy."
                )
            rec = torch.tensor(recording, dtype=torch.long)
            self._initial_sum[rec] += values[rec]
            self._initial_count[rec] += 1
        initial = (self._initial_sum / self._initial_count).to(window_losses)  # NaN for never-labelled tasks
        unchecked = [i for i in present if i not in self._layer_checked]
        unreached = [self.task_names[i] for i in unchecked if float(norms[i]) == 0]
        if unreached:
            raise RuntimeError(
                f"GradNorm: the loss of task(s) {unreached} has an exactly zero gradient on the layer GradNorm "
                f"normalises ({self.layer if self.layer is not None else 'the last shared weight'}): it does not "
                "go through it. Pass GradNorm(layer=...) naming the last layer that every task shares."
            )
        self._layer_checked.update(unchecked)
        w = self._learnable.param.detach()
        if present_mask is None:
            rates = inverse_training_rates(window_losses, initial)
            if bool(torch.isfinite(norms).all()):
                self._learnable.accumulate(gradnorm_weight_grad(w, norms, rates, self.alpha))
            else:  # overflow of the scaled fp16 gradients: the scaler skips this step too
                self._learnable.param.grad = None
            self._last = (w.clone(), norms.detach(), rates.detach())  # logged lazily (extra_metrics)
            self._last_present = None
            return
        # partial labels: the GradNorm problem of the present tasks; only their weights get a gradient
        dev = norms.device
        w_p, n_p = w[index.to(w.device)], norms[index.to(dev)]
        rates = inverse_training_rates(window_losses[index.to(window_losses.device)], initial[index.to(dev)])
        if bool(torch.isfinite(n_p).all()):
            grad = torch.zeros_like(w)
            grad[index.to(w.device)] = gradnorm_weight_grad(w_p, n_p, rates, self.alpha).to(grad)
            self._learnable.accumulate(grad, present=present_mask)
        else:
            self._learnable.param.grad = None
        self._last = (w_p.clone(), n_p.detach(), rates.detach())
        self._last_present = present

    def on_optimizer_step(self, module: pl.LightningModule, skipped: bool) -> None:
        assert self._learnable is not None
        stepped = self._learnable.param.grad is not None and not skipped
        present = self._last_present
        param = self._learnable.param
        if present is not None:  # partial labels: the absent weights' share of T, before the step
            index = torch.tensor(present, dtype=torch.long, device=param.device)
            absent = torch.ones(param.numel(), dtype=torch.bool, device=param.device)
            absent[index] = False
            absent_sum = float(param.detach()[absent].sum())
        self._learnable.step(module.trainer, skipped)
        if stepped:
            with torch.no_grad():
                if present is None:
                    param.copy_(renormalize_weights(param, float(param.numel()), self.min_weight))
                else:  # Σ w = T with the absent weights untouched
                    total = float(param.numel()) - absent_sum
                    param[index] = renormalize_weights(param[index], total, self.min_weight)

    def on_accumulation_window_discarded(self, module: pl.LightningModule) -> None:
        self._gradients.reset()
        self._window_present = None
        if self._learnable is not None:
            self._learnable.discard()  # the window's gradient and which entries it touched

    def reset_state(self) -> None:
        super().reset_state()
        self._learnable = None  # bind() builds fresh weights (1) with a fresh optimizer
        self._initial_sum, self._initial_count = None, None  # Lᵢ(0) belongs to the new run
        self._gradients.reset()
        self._last, self._last_present, self._window_present = None, None, None
        self._layer_checked = set()

    # ------------------------------------------------------------------ reporting and state
    @property
    def initial_losses(self) -> Tensor | None:
        """``Lᵢ(0)`` as used now (the mean over the first ``initial_loss_steps`` steps that label task ``i``; NaN
        for a task not labelled yet), or ``None``."""
        if self._initial_sum is None or self._initial_count is None:
            return None
        return (self._initial_sum / self._initial_count).float()

    def weights_tensor(self) -> Tensor | None:
        """The learned ``w``; with partial labels, 0 for the tasks absent from the last step."""
        if self._learnable is None:
            return None
        w = self._learnable.param.detach()
        if self._last_present is not None:
            mask = torch.zeros_like(w)
            mask[torch.tensor(self._last_present, dtype=torch.long, device=w.device)] = 1
            w = w * mask
        return w

    def extra_metrics(self) -> dict[str, Tensor]:
        """``train/gradnorm/grad_norm/<task>`` (``Gᵢ = wᵢnᵢ``, with the weights the step used),
        ``train/gradnorm/inverse_rate/<task>`` (``rᵢ``) and ``train/gradnorm/loss_grad`` (``L_grad``)."""
        if self._last is None:
            return {}
        w, norms, rates = self._last
        G = w * norms
        names = list(self.task_names)
        if self._last_present is not None:  # partial labels: the present tasks only
            names = [names[i] for i in self._last_present]
        metrics = {"train/gradnorm/loss_grad": gradnorm_objective(w, norms, rates, self.alpha)}
        metrics.update({f"train/gradnorm/grad_norm/{t}": g for t, g in zip(names, G.unbind())})
        metrics.update({f"train/gradnorm/inverse_rate/{t}": r for t, r in zip(names, rates.unbind())})
        return metrics

    def task_state(self) -> dict[str, Any]:
        if self._learnable is None:
            return {}
        return {
            "learnable": self._learnable.state_dict(),
            "initial_sum": None if self._initial_sum is None else self._initial_sum.clone(),
            "initial_count": None if self._initial_count is None else self._initial_count.clone(),
        }

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        if "learnable" not in state:
            return
        assert self._learnable is not None, "bind() builds the weights before a state is loaded"
        self._learnable.load_state_dict(state["learnable"], order)
        initial, count = state["initial_sum"], state["initial_count"]
        self._initial_sum = None if initial is None else take_tasks(initial.double().cpu(), order).clone()
        if initial is None:
            self._initial_count = None
        elif isinstance(count, Tensor):  # per task (partial labels)
            self._initial_count = take_tasks(count.long().cpu(), order).clone()
        else:  # an older checkpoint: one count for every task
            self._initial_count = torch.full((len(order),), int(count), dtype=torch.long)
        # the tasks recorded so far were checked to reach the layer
        self._layer_checked = (
            set(torch.nonzero(self._initial_count > 0).flatten().tolist())
            if (self._initial_count is not None)
            else set()
        )
