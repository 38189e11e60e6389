"""Strategy names on the command line: which strategies exist, the default comparison set, and name lookup."""

from __future__ import annotations

import inspect

from lightning_mtl.strategies.base import MTLStrategy

#: loss-based strategies compared by default
DEFAULT_LOSS_BASED = ("EqualWeighting", "UncertaintyWeighting", "DWA", "RLW", "GLS")
#: gradient-based strategies compared by default when :mod:`lightning_mtl.strategies` provides them
DEFAULT_GRADIENT_BASED = ("PCGrad", "MGDA", "CAGrad", "NashMTL", "UPGrad", "GradNorm")


def available_strategies() -> dict[str, type[MTLStrategy]]:
    """Every concrete strategy class exported by :mod:`lightning_mtl.strategies`, by class name."""
    from lightning_mtl import strategies

    found = {}
    for name in getattr(strategies, "__all__", dir(strategies)):
        obj = getattr(strategies, name, None)
        if not (inspect.isclass(obj) and issubclass(obj, MTLStrategy)) or obj is MTLStrategy:
            continue
        module = obj.__module__.rsplit(".", 1)[-1]
        if module.startswith("_") or module == "base":  # shared bases (LossWeighting, ...), not methods
            continue
        found[name] = obj
    return found


def default_strategies() -> list[str]:
    """The default comparison set: the loss-based methods, then the gradient-based ones that exist."""
    available = available_strategies()
    return [n for n in DEFAULT_LOSS_BASED + DEFAULT_GRADIENT_BASED if n in available]


def resolve_strategy(name: str) -> type[MTLStrategy]:
    """A strategy class from its name: case-insensitive, ``-``/``_`` ignored, ``Weighting`` suffix optional
    (``pcgrad``, ``nash-mtl``, ``uncertainty``)."""
    available = available_strategies()
    key = name.replace("-", "").replace("_", "").lower()
    for cls_name, cls in available.items():
        if key in (cls_name.lower(), cls_name.lower().removesuffix("weighting")):
            return cls
    raise ValueError(f"Unknown strategy {name!r}; available: {', '.join(sorted(available))}.")


def make_strategy(name: str) -> MTLStrategy:
    """A strategy built with its default arguments, from its name (see :func:`resolve_strategy`)."""
    cls = resolve_strategy(name)
    try:
        return cls()
    except TypeError as err:
        raise ValueError(
            f"Strategy {cls.__name__} cannot be built with its defaults ({err}); give it with its arguments in "
            "a config's trainer.callbacks and run lightning-mtl compare --config that.yaml (without --strategies)."
        ) from err
