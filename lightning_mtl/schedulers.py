"""LR schedulers under manual optimisation: what ``configure_optimizers`` asked for, and stepping them.

In manual optimisation Lightning keeps a scheduler's ``interval`` and ``frequency`` but drops ``monitor`` and
``strict`` (with a warning) and steps nothing. :class:`~lightning_mtl.MultiTaskModule` steps the schedulers
itself, so it records those keys from whatever ``configure_optimizers`` returns, however it was supplied:

* a subclass method: wrapped once at class creation (:func:`wrap_configure_optimizers`);
* a function set on the instance (``LightningCLI`` installs its own ``configure_optimizers`` this way):
  wrapped when the fit starts (:func:`wrap_instance_configure_optimizers`);
* a scheduler with a ``monitor`` attribute (``lightning.pytorch.cli.ReduceLROnPlateau``) needs no key at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

__all__ = [
    "record_schedulers",
    "step_schedulers",
    "wrap_configure_optimizers",
    "wrap_instance_configure_optimizers",
]

#: scheduler-dict keys Lightning drops in manual optimisation; recorded here, then stripped (no warning)
_DROPPED = ("monitor", "strict", "reduce_on_plateau")


def wrap_configure_optimizers(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a ``configure_optimizers`` method) that records its schedulers' keys; idempotent."""
    if getattr(fn, "_mtl_wrapped", False):
        return fn

    @functools.wraps(fn)
    def configure_optimizers(module: pl.LightningModule, *args: Any, **kwargs: Any) -> Any:
        return record_schedulers(module, fn(module, *args, **kwargs))

    configure_optimizers._mtl_wrapped = True  # type: ignore[attr-defined]
    return configure_optimizers


def wrap_instance_configure_optimizers(module: pl.LightningModule) -> None:
    """Wrap a ``configure_optimizers`` set on the instance (it bypasses the class-level wrapper); idempotent.

    The wrapper is a :func:`functools.partial` of module-level functions, so the module stays picklable (for
    ``ddp_spawn``) when the instance function is.
    """
    fn = module.__dict__.get("configure_optimizers")
    if fn is None or getattr(fn, "_mtl_wrapped", False):
        return
    wrapped = functools.partial(_call_recording, module, fn)
    wrapped._mtl_wrapped = True  # type: ignore[attr-defined]
    module.__dict__["configure_optimizers"] = wrapped


def _call_recording(module: pl.LightningModule, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return record_schedulers(module, fn(*args, **kwargs))


def record_schedulers(module: pl.LightningModule, output: Any) -> Any:
    """Record (in ``module``) and strip the scheduler-dict keys Lightning drops in manual optimisation."""
    specs: dict[int, dict[str, Any]] = {}
    module.__dict__["_scheduler_specs"] = specs  # keyed by id(scheduler): a new call replaces the old record

    def strip(config: Any) -> Any:
        if not isinstance(config, Mapping) or "scheduler" not in config:
            return config
        if any(k in config for k in _DROPPED):
            specs[id(config["scheduler"])] = {
                "monitor": config.get("monitor"),
                "strict": config.get("strict", True),
            }
        return {k: v for k, v in config.items() if k not in _DROPPED}

    def visit(item: Any) -> Any:
        if isinstance(item, Mapping) and "optimizer" in item:
            out = dict(item)
            if "lr_scheduler" in out:
                out["lr_scheduler"] = strip(out["lr_scheduler"])
            if "monitor" in out:  # a top-level monitor applies to the (single) scheduler
                sched = out.get("lr_scheduler")
                sched_obj = sched.get("scheduler") if isinstance(sched, Mapping) else sched
                if sched_obj is not None:
                    specs.setdefault(id(sched_obj), {"strict": True})["monitor"] = out["monitor"]
                out.pop("monitor")
            return out
        return strip(item)

    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], (list, tuple)):
        return output[0], [visit(s) for s in output[1]]
    if isinstance(output, (list, tuple)):
        return type(output)(visit(o) for o in output)
    return visit(output)


def step_schedulers(module: pl.LightningModule, interval: str) -> None:
    """Step the Trainer's schedulers whose ``interval`` is ``interval`` (``"step"`` or ``"epoch"``), honouring
    ``frequency`` and, for ``ReduceLROnPlateau``, ``monitor``/``strict``."""
    trainer = module.trainer
    configs = trainer.lr_scheduler_configs
    if not configs:
        return
    specs = module.__dict__.get("_scheduler_specs", {})
    n_opt = max(1, len(trainer.optimizers))
    counter = trainer.global_step // n_opt if interval == "step" else trainer.current_epoch + 1
    for config in configs:
        if config.interval not in ("step", "epoch"):
            raise ValueError(
                f"LR scheduler {type(config.scheduler).__name__}: interval must be 'step' or 'epoch', got "
                f"{config.interval!r}. Fix the 'interval' key returned by configure_optimizers."
            )
        if config.interval != interval or counter % config.frequency != 0:
            continue
        spec = specs.get(id(config.scheduler), {})
        metric = None
        if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # lightning.pytorch.cli.ReduceLROnPlateau carries its monitor (LightningCLI configs)
            monitor = spec.get("monitor") or getattr(config.scheduler, "monitor", None)
            if monitor is None:
                raise ValueError(
                    "ReduceLROnPlateau needs a metric to monitor: return {'optimizer': opt, 'lr_scheduler': "
                    "{'scheduler': sched, 'monitor': 'val/loss'}} from configure_optimizers."
                )
            metric = trainer.callback_metrics.get(monitor)
            if metric is None:
                if spec.get("strict", True):
                    available = sorted(trainer.callback_metrics)
                    raise KeyError(
                        f"ReduceLROnPlateau monitors {monitor!r}, which was not logged; available: "
                        f"{available}. Set 'monitor' in configure_optimizers to one of them."
                    )
                rank_zero_warn(f"ReduceLROnPlateau monitor {monitor!r} not logged yet; not stepping.")
                continue
        module.lr_scheduler_step(config.scheduler, metric)
