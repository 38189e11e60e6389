"""The gradient path through the engine: scale invariance end to end, warnings and errors it owns."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TinyNet, loader, make_data, trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_mtl.strategies import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    DualProj,
    GradDrop,
    GradNorm,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)


class ScaledNet(TinyNet):
    """Every task loss multiplied by the same constant ``scale``."""

    def __init__(self, scale: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = scale

    def task_losses(self, batch, batch_idx):
        return {t: loss * self.scale for t, loss in super().task_losses(batch, batch_idx).items()}


SCALE_INVARIANT = [
    lambda: MGDA(),
    lambda: MGDA(mode="representation"),
    lambda: IMTLG(),
    lambda: PCGrad(seed=0),
    lambda: CAGrad(),
    lambda: AlignedMTL(),
    lambda: GradVac(seed=0),
    lambda: UPGrad(),
    lambda: DualProj(),
]


class RepScaledNet(ScaledNet):
    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.shared_representation(self.encoder(x))
        return {
            t: nn.functional.mse_loss(self.heads[t](z).squeeze(1), y[:, i]) * self.scale
            for i, t in enumerate(self.task_names)
        }


def _weights_after_one_step(make, scale: float) -> torch.Tensor:
    strategy = make()
    model = (RepScaledNet if strategy.mode == "representation" else ScaledNet)(scale)
    trainer(max_steps=1, callbacks=[strategy]).fit(model, loader(make_data(n=16)))
    return strategy.weights_tensor().clone()


@pytest.mark.parametrize("make", SCALE_INVARIANT, ids=lambda m: repr(m()))
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_scale_invariant_methods_give_the_same_weights_at_any_loss_scale(make, scale):
    """Issue 7 item 4: the Gramian was formed in float32 (overflow at 1e30: 'not finite'; underflow at
    1e-30: MGDA [.5, .5, .5]-like weights, IMTL-G zeros)."""
    reference = _weights_after_one_step(make, 1.0)
    scaled = _weights_after_one_step(make, scale)
    torch.testing.assert_close(scaled, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_nash_mtl_weights_scale_inversely_so_its_update_does_not_change(scale):
    """Nash-MTL's α solves Gα = 1/α for the raw Gramian: α scales as 1/s, so Jᵀα does not change."""
    reference = _weights_after_one_step(lambda: NashMTL(), 1.0)
    scaled = _weights_after_one_step(lambda: NashMTL(), scale)
    torch.testing.assert_close(scaled * scale, reference, rtol=1e-4, atol=1e-6)


class Unreached(TinyNet):
    """Task ``c``'s head reads the input, not the shared encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.heads["c"] = nn.Linear(6, 1)

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        out = {t: nn.functional.mse_loss(self.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate("ab")}
        out["c"] = nn.functional.mse_loss(self.heads["c"](x).squeeze(1), y[:, 2])
        return out


def test_mgda_warns_once_naming_a_task_that_does_not_reach_the_shared_parameters():
    strategy = MGDA()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=4, callbacks=[strategy]).fit(Unreached(), loader(make_data(n=64)))
    about_c = [w for w in caught if "task 'c'" in str(w.message)]
    assert len(about_c) == 1, [str(w.message) for w in caught]
    message = str(about_c[0].message)
    assert "does not reach" in message and message.startswith("MGDA") and "weights: {'a'" in message


class FreezeEncoder(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            pl_module.encoder[0].weight.requires_grad_(False)


def test_gradnorm_layer_frozen_during_training_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"GradNorm: its parameter 'encoder.0.weight' is frozen"):
        trainer(max_epochs=1, callbacks=[GradNorm(), FreezeEncoder()]).fit(TinyNet(), loader(make_data(n=64)))


class StoredGenerator(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self._shared = self.encoder.parameters()  # a generator: consumed by its first use

    def shared_parameters(self):
        return self._shared


def test_consumed_shared_parameters_generator_is_named():
    with pytest.raises(ValueError, match=r"iterator that yields nothing.*already consumed.*fresh iterator"):
        trainer(max_steps=2, callbacks=[PCGrad()]).fit(StoredGenerator(), loader(make_data(n=32)))


class AllFrozen(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.encoder.requires_grad_(False)


def test_all_shared_parameters_frozen_is_named():
    with pytest.raises(
        ValueError, match=r"all 2 parameters returned by AllFrozen.shared_parameters\(\) are frozen"
    ):
        trainer(max_steps=1, callbacks=[MGDA()]).fit(AllFrozen(), loader(make_data(n=16)))


def test_graddrop_without_a_representation_does_not_suggest_a_mode_it_lacks():
    with pytest.raises(RuntimeError) as info:
        trainer(max_steps=1, callbacks=[GradDrop()]).fit(TinyNet(), loader(make_data(n=8)))
    message = str(info.value)
    assert "shared_representation(z)" in message and "mode='parameters'" not in message
    assert "representation only" in message
