"""What per-task gradients are taken of: the shared parameters, another parameter set (GradNorm's layer) or
the marked shared representation; and the AMP loss scale they are taken under."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import lightning.pytorch as pl
from torch import Tensor, nn


def shared_parameters_of(module: nn.Module, owner: str) -> list[nn.Parameter]:
    """The trainable shared parameters declared by ``module.shared_parameters()`` (deduplicated, in order).

    Raises a ``ValueError`` naming ``owner`` (the strategy or diagnostic) when the module declares none, when
    the method returned an already-consumed iterator, or when every declared parameter is frozen.
    """
    declared = module.shared_parameters() if hasattr(module, "shared_parameters") else None
    cls = type(module).__name__
    fix = (
        f"{owner} needs the shared parameters: override shared_parameters() in {cls} to return them, e.g. "
        "`def shared_parameters(self): return self.encoder.parameters()`"
    )
    if declared is None:
        raise ValueError(f"{cls}.shared_parameters() returned None. {fix}.")
    one_shot = isinstance(declared, Iterator)
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    frozen = 0
    for p in declared:
        if not isinstance(p, Tensor):
            raise TypeError(
                f"{cls}.shared_parameters() must yield parameters, got {type(p).__name__}. {fix}."
            )
        if not p.requires_grad:
            frozen += 1
        elif id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if params:
        return params
    if frozen:
        raise ValueError(
            f"{owner}: all {frozen} parameters returned by {cls}.shared_parameters() are frozen "
            "(requires_grad=False), so there is no shared gradient to balance. Unfreeze part of the encoder, or "
            "use a loss-based strategy while it is frozen."
        )
    if one_shot:
        raise ValueError(
            f"{cls}.shared_parameters() returned an iterator that yields nothing: most likely a generator that "
            "was already consumed (e.g. `self.encoder.parameters()` stored once in __init__ and returned on "
            "every call). Return a fresh iterator on each call (`return self.encoder.parameters()`) or a list."
        )
    raise ValueError(f"{cls}.shared_parameters() yielded no parameter. {fix}.")


def check_trainable(module: nn.Module, params: Iterable[Tensor], owner: str, what: str) -> None:
    """Raise a clear error when a parameter the owner takes gradients of was frozen during training."""
    frozen = [p for p in params if not p.requires_grad]
    if not frozen:
        return
    names = {id(p): n for n, p in module.named_parameters()}
    listed = ", ".join(repr(names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")) for p in frozen)
    raise RuntimeError(
        f"{owner}: {what} {listed} {'is' if len(frozen) == 1 else 'are'} frozen (requires_grad=False), but "
        f"{owner} needs its per-task gradients. Unfreeze it, or point {owner} at a trainable layer."
    )


def marked_representation(module: nn.Module, owner: str, fix: str | None = None) -> Tensor:
    """The tensor marked by ``self.shared_representation(z)`` in this training step's ``task_losses``.

    ``fix`` replaces the default advice (use ``mode="parameters"``) for owners that have no parameters mode.
    """
    z = getattr(module, "marked_representation", None)
    advice = fix if fix is not None else "or use mode='parameters'"
    if z is None:
        architecture = getattr(module, "architecture", None)
        reason = getattr(architecture, "representation_unsupported", None)
        if reason:
            raise RuntimeError(
                f"{owner} needs one shared representation that every task head consumes, but "
                f"{type(architecture).__name__} has none: {reason} Its shared parameters are known: "
                f"{advice.removeprefix('or ')}."
            )
        raise RuntimeError(
            f"{owner} needs the shared representation, but {type(module).__name__}.task_losses did not mark one "
            "in this training step. Pass the shared features through `z = self.shared_representation(z)` "
            f"before the task heads, {advice}."
        )
    if not z.requires_grad:
        raise RuntimeError(
            f"{owner}: the tensor marked with shared_representation() does not require grad (it is detached from "
            "the encoder). Mark the encoder's output itself."
        )
    return z


def grad_scale(trainer: pl.Trainer | None) -> float | None:
    """The current loss scale of the Trainer's GradScaler (``precision="16-mixed"``), else ``None``."""
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


ParameterSource = Callable[[nn.Module], list[nn.Parameter]]
