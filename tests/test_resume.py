"""Checkpoints: k epochs + save + resume k epochs == 2k epochs straight, for every stateful strategy."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyNet, flat_params, loader, make_data, trainer

from lightning_mtl.strategies import DWA, RLW, UncertaintyWeighting

STRATEGIES = {
    "uncertainty-adam": lambda: UncertaintyWeighting(optimizer="adam", lr=0.05),
    "uncertainty-positive": lambda: UncertaintyWeighting(regularizer="positive", optimizer="match"),
    "dwa": lambda: DWA(),
    "rlw": lambda: RLW(seed=7),
    "rlw-dirichlet": lambda: RLW(distribution="dirichlet", concentration=0.5, seed=1),
}
K = 2  # epochs per half; DWA weights move from epoch 2 on, so the resumed half uses restored history


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_resume_matches_uninterrupted(tmp_path, name):
    data = loader(make_data(n=48), batch_size=12)

    straight = TinyNet(optimizer="adam", lr=0.01)
    s_straight = STRATEGIES[name]()
    trainer(max_epochs=2 * K, callbacks=[s_straight]).fit(straight, data)

    first = TinyNet(optimizer="adam", lr=0.01)
    t1 = trainer(max_epochs=K, callbacks=[STRATEGIES[name]()])
    t1.fit(first, data)
    ckpt = tmp_path / "half.ckpt"
    t1.save_checkpoint(ckpt)

    resumed = TinyNet(optimizer="adam", lr=0.01)
    s_resumed = STRATEGIES[name]()
    trainer(max_epochs=2 * K, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=ckpt)

    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    for task, w in s_straight.weights.items():
        assert s_resumed.weights[task] == pytest.approx(w, abs=1e-6)
    # the state really is restored, not re-initialised
    assert s_resumed.state_dict().keys() == s_straight.state_dict().keys()


def test_strategy_state_is_in_the_checkpoint(tmp_path):
    strategy = UncertaintyWeighting(lr=0.1)
    t = trainer(max_epochs=1, callbacks=[strategy])
    t.fit(TinyNet(), loader(make_data(n=32)))
    t.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True)  # tensors and primitives only
    (state,) = [v for k, v in ckpt["callbacks"].items() if "UncertaintyWeighting" in k]
    torch.testing.assert_close(state["state"]["learnable"]["values"], strategy.params.detach())
    assert state["tasks"] == ["a", "b", "c"] and state["config"]["regularizer"] == "log"
    assert not torch.equal(state["state"]["learnable"]["values"], torch.zeros(3)), "log-variances never moved"


@pytest.mark.parametrize("name", ["dwa", "uncertainty-adam", "rlw"])
def test_mid_epoch_resume_by_steps(tmp_path, name):
    # ScalarNet's losses do not depend on the batch, so only the strategy state decides the trajectory
    from helpers import ScalarNet, dummy_loader

    def run(max_steps, ckpt=None):
        net, strategy = ScalarNet(lr=0.01), STRATEGIES[name]()
        t = trainer(max_epochs=-1, max_steps=max_steps, callbacks=[strategy])
        t.fit(net, dummy_loader(4), ckpt_path=ckpt)
        return t, net, strategy

    _, straight, s_straight = run(14)
    t_half, _, _ = run(7)  # stops in the middle of the second epoch
    t_half.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed, s_resumed = run(14, tmp_path / "mid.ckpt")
    assert resumed.theta.item() == pytest.approx(straight.theta.item(), abs=1e-6)
    assert s_resumed.weights == pytest.approx(s_straight.weights, abs=1e-6)
