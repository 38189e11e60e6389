"""FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) and a backward taken inside the forward.

Lightning's FSDP strategy calls ``training_step`` through the root FSDP unit's forward, and
:class:`~lightning_mtl.MultiTaskModule` back-propagates inside ``training_step`` (manual optimisation). FSDP1
prepares a backward from the pre-backward hooks it registers on a unit's outputs *after* the unit's forward, and
only the root's hook queues the callback that finalises the backward (it moves the reduced gradient shards where
the optimizer reads them, resets the units' states and clears the gradient saved for accumulation). A backward
inside the root's forward runs none of the root's hooks: without :func:`fsdp1_backward`, every unit's sharded
gradient of one step would be added to the next step's, and a root that holds parameters would fail FSDP's
state assertion in its post-backward hook. :func:`fsdp1_backward` runs the root's pre-backward hook from a hook on
the loss (inside the backward, where FSDP queues its final callback), so the backward is FSDP's usual one.

:func:`quiet_fsdp_hooks` is the converse, for the per-task gradients
(:mod:`~lightning_mtl.gradients.flat_sharded`): a ``torch.autograd.grad`` through the units that must leave
FSDP's state untouched. Reads FSDP1's private state (the handles' and states' flags, ``_pre_backward_hook``);
checked on torch 2.13 by ``tests/test_flat_sharded.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

__all__ = ["fsdp1_backward", "fsdp1_root", "fsdp1_units", "quiet_fsdp_hooks"]


def _fsdp1_class() -> type | None:
    """``FullyShardedDataParallel``, or ``None`` for a torch without it."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without FSDP
        return None
    return FullyShardedDataParallel


def fsdp1_units(module: nn.Module) -> list[nn.Module]:
    """The FSDP1 (``FullyShardedDataParallel``) instances among ``module`` and its submodules."""
    fsdp = _fsdp1_class()
    return [] if fsdp is None else [m for m in module.modules() if isinstance(m, fsdp)]


def fsdp1_root(model: nn.Module | None) -> bool:
    """Whether ``model`` (Lightning's ``trainer.strategy.model``) is an FSDP1 unit. Inside its forward, FSDP1's
    ``no_sync()`` cannot be entered (it asserts that no forward or backward runs): the micro-batches of an
    accumulation window then back-propagate with FSDP's reduce-scatter each, summed into the gradient shards —
    the same gradients, without ``no_sync``'s unsharded accumulation."""
    fsdp = _fsdp1_class()
    return fsdp is not None and isinstance(model, fsdp)


@contextmanager
def quiet_fsdp_hooks(units: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, FSDP1's pre-backward hooks of ``units`` do nothing (as if they had run for this backward):
    a ``torch.autograd.grad`` through the units neither prepares their gradients nor queues the final reshard.
    Needs the parameters unsharded (``SHARD_GRAD_OP``: they are, between the forward and the backward)."""
    handles = [h for h in (getattr(u, "_handle", None) for u in units) if h is not None]
    saved = [getattr(h, "_ran_pre_backward_hook", False) for h in handles]
    for h in handles:
        h._ran_pre_backward_hook = True
    try:
        yield
    finally:
        for h, flag in zip(handles, saved, strict=True):
            h._ran_pre_backward_hook = flag


def fsdp1_backward(model: nn.Module | None, loss: Tensor) -> None:
    """Before ``loss.backward()`` inside the forward of ``model``'s root FSDP1 unit (Lightning's
    ``FSDPStrategy``: ``trainer.strategy.model``): a hook on ``loss`` that runs the root's pre-backward hook when
    the backward starts (it queues FSDP's final callback and prepares the root's own flat parameter), as FSDP's
    own hook on the root's outputs would after the forward (which then finds it done). Nothing when ``model`` is
    not an FSDP1 root, or when ``loss`` needs no gradient."""
    if not loss.requires_grad or not fsdp1_root(model) or not getattr(model, "_is_root", False):
        return
    from torch.distributed.fsdp._common_utils import TrainingState
    from torch.distributed.fsdp._runtime_utils import _pre_backward_hook

    def root_pre_backward(grad: Tensor) -> Tensor:
        if not getattr(model, "_post_backward_callback_queued", False):
            # inside the root's forward: the state FSDP's hook expects after a forward (the flag is unset until
            # the root's first forward has ended)
            model._post_backward_callback_queued = False
            model.training_state = TrainingState.IDLE
        return _pre_backward_hook(model, model, model._handle, grad)

    loss.register_hook(root_pre_backward)
