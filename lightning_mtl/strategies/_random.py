"""The random generator of the strategies that draw (RLW, PCGrad's and GradVac's task orders, GradDrop)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_mtl.strategies.base import global_seed


class SeededGenerator:
    """A CPU generator seeded on first use with ``seed`` (``None``: Lightning's global seed, else 0).

    Identical on every rank (same seed, same draws), whatever the world size; its state round-trips through
    checkpoints under the key ``"generator"``. :meth:`reset` makes a new training run draw as a new strategy.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None

    def get(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(global_seed(self.seed))
        return self._generator

    def reset(self) -> None:
        self._generator = None

    def state(self) -> dict[str, Any]:
        """``{"generator": state}`` once drawn from (or seeded), else ``{}``."""
        return {} if self._generator is None else {"generator": self._generator.get_state()}

    def load(self, state: Mapping[str, Any]) -> None:
        if "generator" in state:
            self._generator = torch.Generator()
            self._generator.set_state(state["generator"])
