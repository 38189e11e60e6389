"""Gradient strategies under AMP: fp16 with a GradScaler (CPU plugin trick) and bf16 match fp32 closely;
an overflowing scale makes the scaler skip the step without corrupting the strategy's weights."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RepTinyNet, flat_params, loader, make_data, trainer
from lightning.pytorch.plugins import MixedPrecision

from lightning_mtl.strategies.graddrop import GradDrop
from lightning_mtl.strategies.mgda import MGDA
from lightning_mtl.strategies.nash_mtl import NashMTL
from lightning_mtl.strategies.pcgrad import PCGrad

STRATEGIES = {
    # Nash-MTL's weights scale as 1/‖J‖: a Jacobian left scaled by the GradScaler would shrink them by √scale
    "nash": lambda: NashMTL(max_norm=None),
    "mgda-ub": lambda: MGDA(mode="representation"),
    "pcgrad": lambda: PCGrad(seed=0),
}


def _fp16(init_scale: float = 2.0**10) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def _fit(name: str, **kwargs):
    model, strategy = RepTinyNet(), STRATEGIES[name]()
    trainer(max_epochs=2, callbacks=[strategy], **kwargs).fit(model, loader(make_data(n=64), batch_size=16))
    return flat_params(model), strategy.weights_tensor()


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_matches_fp32(name, precision):
    params32, w32 = _fit(name)
    kwargs = {"plugins": [_fp16()]} if precision == "16-mixed" else {"precision": "bf16-mixed"}
    params, w = _fit(name, **kwargs)
    tol = 2e-3 if precision == "16-mixed" else 3e-2
    torch.testing.assert_close(w, w32, atol=tol, rtol=tol)
    torch.testing.assert_close(params, params32, atol=tol, rtol=tol)


def test_fp16_overflow_skips_steps_and_keeps_weights_finite():
    plugin = _fp16(init_scale=2.0**30)  # fp16 gradients overflow until the scale has backed off
    model, strategy = RepTinyNet(), NashMTL()
    before = flat_params(model)
    trainer(max_steps=1, plugins=[plugin], callbacks=[strategy]).fit(
        model, loader(make_data(n=16), batch_size=16)
    )
    assert torch.equal(flat_params(model), before), "the overflowing step was applied"
    assert plugin.scaler.get_scale() < 2.0**30
    assert strategy.weights_tensor() is None  # no weights from a non-finite Jacobian

    plugin = _fp16(init_scale=2.0**30)
    model, strategy = RepTinyNet(), NashMTL()
    trainer(max_steps=30, max_epochs=5, plugins=[plugin], callbacks=[strategy]).fit(
        model, loader(make_data(n=64), batch_size=8)
    )
    assert model.skipped_steps == 0  # skipped by the scaler, not discarded by the module
    w = strategy.weights_tensor()
    assert w is not None and all(math.isfinite(v) for v in w.tolist())
    assert not torch.equal(flat_params(model), before)
    assert bool(torch.isfinite(flat_params(model)).all())


def test_graddrop_runs_under_fp16():
    model = RepTinyNet()
    before = flat_params(model)
    trainer(max_steps=4, plugins=[_fp16()], callbacks=[GradDrop(seed=0)]).fit(
        model, loader(make_data(n=32), batch_size=8)
    )
    after = flat_params(model)
    assert bool(torch.isfinite(after).all()) and not torch.equal(after, before)
