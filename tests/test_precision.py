"""Mixed precision: loss-weighting strategies under bf16 and fp16 (CPU GradScaler plugin)."""

from __future__ import annotations

import pytest
import torch
from helpers import ScalarNet, TinyNet, dummy_loader, flat_params, loader, make_data, trainer
from lightning.pytorch.plugins import MixedPrecision

from lightning_mtl.strategies import DWA, GLS, RLW, UncertaintyWeighting


def fp16_plugin(init_scale: float = 2.0**16) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


@pytest.mark.parametrize("make", [UncertaintyWeighting, DWA, lambda: RLW(seed=0), GLS])
@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-scaler"])
def test_strategies_train_under_mixed_precision(make, precision):
    kwargs = {"plugins": [fp16_plugin()]} if precision == "fp16-scaler" else {"precision": "bf16-mixed"}
    net = TinyNet()
    before = flat_params(net)
    strategy = make()
    trainer(max_epochs=3, callbacks=[strategy], **kwargs).fit(net, loader(make_data(n=32)))
    after = flat_params(net)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert all(torch.isfinite(torch.tensor(w)) for w in strategy.weights.values())


def test_fp16_matches_fp32_for_a_model_without_autocast_ops():
    # ScalarNet has no autocast-affected op: the fp16 run with a loss scale of 2^16 must equal fp32 exactly
    plain = ScalarNet()
    trainer(max_steps=3, callbacks=[UncertaintyWeighting(optimizer="sgd", lr=0.1)]).fit(
        plain, dummy_loader(3)
    )
    scaled = ScalarNet()
    s = UncertaintyWeighting(optimizer="sgd", lr=0.1)
    trainer(max_steps=3, callbacks=[s], plugins=[fp16_plugin()]).fit(scaled, dummy_loader(3))
    assert scaled.theta.item() == pytest.approx(plain.theta.item(), rel=1e-6)


def test_a_step_the_scaler_skips_does_not_move_learnable_strategy_parameters():
    # a loss scale of 2^127 overflows the scaled gradients: the GradScaler skips the first step (and halves its
    # scale); the uncertainty log-variances must not move either
    strategy = UncertaintyWeighting(optimizer="sgd", lr=0.5)
    net = ScalarNet()
    trainer(max_steps=1, callbacks=[strategy], plugins=[fp16_plugin(2.0**127)]).fit(net, dummy_loader(1))
    assert net.theta.item() == 1.0
    assert torch.equal(strategy.params.detach(), torch.zeros(2))
