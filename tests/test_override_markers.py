"""Every Lightning hook our callbacks and module override carries ``@override``: a hook Lightning renames then
fails loudly in review (the marker names a method that no longer exists) instead of silently never running."""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import pytest

import lightning_mtl.callbacks as callbacks
import lightning_mtl.strategies as strategies
from lightning_mtl import MultiTaskModule


def _classes():
    for module in (strategies, callbacks):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and issubclass(obj, pl.Callback):
                yield obj
    yield MultiTaskModule


@pytest.mark.parametrize("cls", list(_classes()), ids=lambda c: c.__name__)
def test_lightning_hooks_are_marked_override(cls):
    base = pl.LightningModule if issubclass(cls, pl.LightningModule) else pl.Callback
    hooks = {name for name in dir(base) if not name.startswith("_")}
    unmarked = []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("lightning_mtl"):
            continue
        for name, value in vars(klass).items():
            func = value.fget if isinstance(value, property) else value
            if name in hooks and callable(func) and not getattr(func, "__override__", False):
                unmarked.append(f"{klass.__name__}.{name}")
    assert not unmarked, f"Lightning hooks overridden without @override: {unmarked}"
