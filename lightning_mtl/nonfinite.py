"""The ``nonfinite`` policy of :class:`~lightning_mtl.MultiTaskModule`: NaN/inf losses and gradients.

* Losses are checked every (micro-)batch on their rank average, so every DDP rank decides alike.
* The update is checked once per optimizer step, before the step, with one fused kernel and one host sync (the
  2-norm of each gradient: NaN/inf propagate; a norm that overflows on finite values is re-checked element-wise).
  DDP has averaged the gradients by then, so every rank decides alike. Under 16-bit AMP the GradScaler owns inf/NaN gradients (it
  skips the step and lowers its scale): no check.
* ``"raise"`` stops with an error naming the batch, the tasks or parameters and the values; ``"skip"`` warns,
  discards the accumulation window and skips its optimizer step, and raises after ``max_consecutive_skips``
  windows in a row were discarded (nothing is training any more).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

NonFinitePolicy = Literal["raise", "skip"]

__all__ = ["NonFiniteGuard", "NonFinitePolicy"]

_MAX_NAMES = 5  # parameters named in a message


class NonFiniteGuard:
    """Applies the policy and counts discarded windows.

    Args:
        policy: ``"raise"`` or ``"skip"``.
        max_consecutive_skips: under ``"skip"``, raise after this many consecutive discarded windows.
        task_names: the module's tasks, in order.
    """

    def __init__(
        self, policy: NonFinitePolicy, max_consecutive_skips: int, task_names: Sequence[str]
    ) -> None:
        if policy not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {policy!r}.")
        if (
            isinstance(max_consecutive_skips, bool)
            or not isinstance(max_consecutive_skips, int)
            or max_consecutive_skips < 1
        ):
            raise ValueError(
                f"max_consecutive_skips must be an int >= 1, got {max_consecutive_skips!r} (it bounds how many "
                "optimizer steps in a row nonfinite='skip' may skip before stopping the fit)."
            )
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.task_names = tuple(task_names)
        self.skipped = 0  # windows discarded in this module's life (``skipped_steps``)
        self.consecutive = 0
        self.window_discarded = False  # the current accumulation window will be discarded
        self._causes: dict[str, None] = {}  # what made the consecutive windows non-finite (ordered set)
        self._first_batch: int | None = None

    # ------------------------------------------------------------------ checks
    def check_losses(self, local: Tensor, global_: Tensor, stage: str, batch_idx: int, epoch: int) -> bool:
        """``True`` if every loss is finite; else raise or (``"skip"``) warn and return ``False``.

        ``local`` are this rank's losses, ``global_`` their rank average (the same tensor on one process);
        the decision reads ``global_`` so that every rank takes it alike.
        """
        if bool(torch.isfinite(global_).all()):
            return True
        local_values, global_values = local.tolist(), global_.tolist()
        bad, names = [], []
        for i, name in enumerate(self.task_names):
            if not math.isfinite(global_values[i]) or not math.isfinite(local_values[i]):
                where = f"{local_values[i]}" + (
                    f" on this rank, {global_values[i]} averaged over ranks" if local is not global_ else ""
                )
                bad.append(f"task {name!r} loss is {where}")
                names.append(name)
        message = f"Non-finite loss at {stage} batch {batch_idx} (epoch {epoch}): " + "; ".join(bad)
        if stage != "training":
            if self.policy == "raise":
                raise FloatingPointError(
                    message + ". Fix the loss, or use nonfinite='skip' to leave such batches out."
                )
            rank_zero_warn(message + "; leaving this batch out of the epoch average (nonfinite='skip').")
            return False
        if self.policy == "raise":
            raise FloatingPointError(
                message
                + ". Fix the loss (check inputs, labels, learning rate, log of zero) or construct the "
                "module with nonfinite='skip' to skip such steps."
            )
        rank_zero_warn(message + "; skipping this optimizer step (nonfinite='skip').")
        self._discard(batch_idx, (f"loss of task {n!r}" for n in names))
        return False

    def check_gradients(
        self, module: torch.nn.Module, params: Sequence[Tensor], batch_idx: int, epoch: int, window: int = 1
    ) -> bool:
        """``True`` if the gradients of ``params`` (those about to be applied) are all finite; else raise or
        (``"skip"``) warn and return ``False``. One fused reduction and one host sync; the parameters are named
        (from ``module``) only on failure."""
        if not params:
            return True
        if _all_finite([p.grad for p in params]):
            return True
        bad_params = [p for p in params if not bool(p.grad.isfinite().all())]
        if not bad_params:  # finite gradients whose 2-norm overflows: not this policy's business
            return True
        names = {id(p): n for n, p in module.named_parameters()}
        bad = [names.get(id(p), "<unnamed>") for p in bad_params]
        shown = ", ".join(repr(n) for n in bad[:_MAX_NAMES]) + (
            f" and {len(bad) - _MAX_NAMES} more" if len(bad) > _MAX_NAMES else ""
        )
        where = (
            f"batch {batch_idx}" if window == 1 else f"the accumulation window ending at batch {batch_idx}"
        )
        message = (
            f"Non-finite gradient at training {where} (epoch {epoch}), from finite losses: the GRADIENT, not "
            f"the loss, of {len(bad)} parameter(s) contains NaN/inf: {shown}"
        )
        if self.policy == "raise":
            raise FloatingPointError(
                message + ". Look for an operation with an infinite derivative at the value it met (sqrt or "
                "pow(x, <1) at 0, log near 0, a custom autograd function), or construct the module with "
                "nonfinite='skip' to skip such steps."
            )
        rank_zero_warn(message + "; skipping this optimizer step (nonfinite='skip').")
        self._discard(batch_idx, (f"gradient of {n!r}" for n in bad[:_MAX_NAMES]))
        return False

    # ------------------------------------------------------------------ window bookkeeping
    def _discard(self, batch_idx: int, causes: Iterable[str]) -> None:
        self.window_discarded = True
        self._causes.update(dict.fromkeys(causes))
        if self._first_batch is None:
            self._first_batch = batch_idx

    def window_skipped(self, batch_idx: int, epoch: int) -> None:
        """A window was discarded: count it, and stop the fit after ``max_consecutive_skips`` in a row."""
        self.window_discarded = False
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive_skips:
            causes = ", ".join(self._causes) or "unknown"
            raise FloatingPointError(
                f"nonfinite='skip' skipped {self.consecutive} optimizer steps in a row (from batch "
                f"{self._first_batch} to batch {batch_idx}, epoch {epoch}), so the model is no longer training. "
                f"Non-finite: {causes}. Fix the data or the loss (e.g. NaN labels, log of zero), or raise "
                f"max_consecutive_skips (now {self.max_consecutive_skips})."
            )

    def window_stepped(self) -> None:
        """An optimizer step was taken: the run of skipped windows ends."""
        self.consecutive = 0
        self._causes.clear()
        self._first_batch = None


def tensor_finite(x: Tensor) -> Tensor:
    """Whether every element of ``x`` is finite, as a 0-dim bool tensor. A non-finite element makes the sum
    non-finite (NaN, or ±inf), so a finite sum proves every element finite in one reduction (about 30x cheaper
    on the CPU than ``isfinite(x).all()`` for a Jacobian); a non-finite sum can also be an overflow of the sum
    alone, so then every element is checked (one host sync more, only then)."""
    finite = torch.isfinite(x.sum())
    return finite if bool(finite) else torch.isfinite(x).all()


def _all_finite(grads: list[Tensor]) -> bool:
    """Whether every element of ``grads`` is finite: one fused kernel per device and dtype, one host sync.

    Uses the kernel the GradScaler checks gradients with (``torch._amp_foreach_non_finite_check_and_unscale_``,
    with an unscale factor of exactly 1: the gradients are left as they are): about 8x faster on CPU than a
    ``torch._foreach_norm`` (whose 2-norm could also overflow on finite values). Falls back to per-tensor
    checks where that kernel is unavailable (sparse gradients, an exotic dtype).
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    found: list[Tensor] = []
    try:
        for (device, _), group in groups.items():
            flag, one = torch.zeros(1, device=device), torch.ones(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, flag, one)
            found.append(flag.to(grads[0].device))
    except (RuntimeError, NotImplementedError, TypeError):
        dense = [g.coalesce().values() if g.is_sparse else g for g in grads]
        return all(bool(torch.isfinite(g).all()) for g in dense)
    return not bool(torch.stack(found).any())
