"""Gradient strategies under AMP: fp16 with a GradScaler (CPU plugin trick) and bf16 match fp32 closely;
an overflowing scale makes the scaler skip the step without corrupting the strategy's weights."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    RecordState,
    RepTinyNet,
    TinyNet,
    flat_params,
    load_record,
    loader,
    make_data,
    restore_environ,
    trainer,
)
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


class RankOverflow(TinyNet):
    """Rank 1's first batch has a loss whose fp16 per-task gradients overflow; rank 0's does not."""

    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        if self.global_rank == 1 and batch_idx == 0:
            losses["a"] = losses["a"] * 1e6
        return losses


@pytest.mark.timeout(180)
def test_local_sync_under_ddp_every_rank_agrees_on_an_overflow_of_one(tmp_path):
    # sync="local": each rank checks its own Jacobian; they must agree before the weights' average over ranks
    # (else rank 0 waits in that all-reduce while rank 1 skips it: a hang)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with restore_environ():
        trainer(
            strategy="ddp_spawn",
            devices=2,
            max_epochs=1,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
            callbacks=[MGDA(sync="local"), RecordState(str(tmp_path))],
        ).fit(RankOverflow(), loader(make_data(n=32), 4))
    r0, r1 = load_record(str(tmp_path), 0), load_record(str(tmp_path), 1)
    assert torch.equal(r0["params"], r1["params"]) and torch.isfinite(r0["params"]).all()
    assert r0["global_step"] == r1["global_step"]
