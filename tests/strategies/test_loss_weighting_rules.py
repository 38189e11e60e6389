"""Each loss-weighting strategy against its paper's rule, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ScalarNet, dummy_loader, trainer

from lightning_mtl import Task
from lightning_mtl.functional import (
    dwa_weights,
    gls_loss,
    gls_weights,
    random_weights,
    uncertainty_objective,
    uncertainty_weights,
)
from lightning_mtl.strategies import DWA, GLS, RLW, EqualWeighting, StaticWeighting, UncertaintyWeighting

# ScalarNet defaults: θ0 = 1, k = (1, 2), targets = (0, 3): L = (1, 8), ∇L = (2, -8), lr = 0.1


def one_step(strategy, **net_kwargs):
    net = ScalarNet(**net_kwargs)
    trainer(max_steps=1, callbacks=[strategy] if strategy else []).fit(net, dummy_loader(1))
    return net


def test_equal_weighting_sums_the_losses():
    net = one_step(EqualWeighting())
    # θ1 = 1 - 0.1 * (2 - 8) = 1.6
    assert net.theta.item() == pytest.approx(1.6)
    assert net.strategy.weights == {"t0": 1.0, "t1": 1.0}


def test_no_strategy_is_equal_weighting_and_task_weights_give_static():
    assert one_step(None).theta.item() == pytest.approx(1.6)
    net = one_step(None, tasks=[Task("t0", weight=2.0), Task("t1", weight=0.5)])
    # θ1 = 1 - 0.1 * (2*2 + 0.5*(-8)) = 1.0
    assert net.theta.item() == pytest.approx(1.0)
    assert type(net.strategy).__name__ == "StaticWeighting"


def test_static_weighting():
    net = one_step(StaticWeighting({"t0": 3.0, "t1": 0.25}))
    # θ1 = 1 - 0.1 * (3*2 + 0.25*(-8)) = 0.6
    assert net.theta.item() == pytest.approx(0.6)
    net = one_step(StaticWeighting([3.0, 0.25]))
    assert net.theta.item() == pytest.approx(0.6)


def test_gls_uses_effective_weights():
    net = one_step(GLS())
    # GLS = sqrt(1*8) = 2.828; w = GLS / (2 L) = (1.414, 0.177); θ1 = 1 - 0.1*(1.414*2 - 0.177*8) = 0.8586
    g = math.sqrt(8.0)
    w = (g / 2, g / 16)
    assert net.theta.item() == pytest.approx(1 - 0.1 * (w[0] * 2 - w[1] * 8), rel=1e-6)
    assert net.strategy.weights["t0"] == pytest.approx(w[0], rel=1e-6)


def test_gls_weights_are_the_gradient_of_the_geometric_mean():
    losses = torch.tensor([1.0, 4.0, 0.5], requires_grad=True)
    (grad,) = torch.autograd.grad(gls_loss(losses), losses)
    torch.testing.assert_close(gls_weights(losses.detach()), grad)
    # hand: GLS = (1*4*0.5)^(1/3) = 2^(1/3)
    assert gls_loss(losses).item() == pytest.approx(2 ** (1 / 3))


def test_uncertainty_first_step_and_log_variance_update():
    net = one_step(UncertaintyWeighting(task_kinds={"t1": "classification"}, optimizer="sgd", lr=0.5))
    s = net.strategy
    # s0 = 0: w = (½·e⁰, 1·e⁰) = (0.5, 1); θ1 = 1 - 0.1*(0.5*2 + 1*(-8)) = 1.7
    assert net.theta.item() == pytest.approx(1.7)
    # ∂/∂s (c e^{-s} L + s/2) = -c L + 0.5 = (-0.5*1 + 0.5, -1*8 + 0.5) = (0, -7.5); s1 = -0.5 * grad
    torch.testing.assert_close(s.params.detach(), torch.tensor([0.0, 3.75]))
    w = s.weights
    assert w["t0"] == pytest.approx(0.5) and w["t1"] == pytest.approx(math.exp(-3.75))


def test_uncertainty_converges_to_the_paper_optimum():
    # θ frozen (lr 0) so the losses stay (1, 8); the optimum of c e^{-s} L + s/2 is e^s = 2cL
    strategy = UncertaintyWeighting(task_kinds={"t1": "classification"}, optimizer="sgd", lr=0.2)
    trainer(max_steps=400, callbacks=[strategy]).fit(ScalarNet(lr=0.0), dummy_loader(400))
    torch.testing.assert_close(
        strategy.params.detach(), torch.tensor([math.log(1.0), math.log(16.0)]), atol=1e-3, rtol=0
    )
    # regression weight -> 1/(2L)
    assert strategy.weights["t0"] == pytest.approx(0.5, abs=1e-3)


def test_uncertainty_positive_regulariser_optimum():
    # L/(2c²) + ln(1+c²): stationary at c² = (L + sqrt(L² + 8L)) / 4
    strategy = UncertaintyWeighting(regularizer="positive", optimizer="sgd", lr=0.05)
    trainer(max_steps=2000, callbacks=[strategy]).fit(ScalarNet(lr=0.0), dummy_loader(2000))
    c2 = strategy.params.detach() ** 2
    expected = torch.tensor([(L + math.sqrt(L * L + 8 * L)) / 4 for L in (1.0, 8.0)])
    torch.testing.assert_close(c2, expected, atol=1e-3, rtol=1e-3)


def test_uncertainty_bounds_clamp():
    strategy = UncertaintyWeighting(optimizer="sgd", lr=5.0, bounds=(-1.0, 1.0))
    trainer(max_steps=20, callbacks=[strategy]).fit(ScalarNet(lr=0.0, k=(1.0, 50.0)), dummy_loader(20))
    assert strategy.params.max().item() <= 1.0 and strategy.params.min().item() >= -1.0


def test_uncertainty_objective_function():
    L = torch.tensor([2.0, 3.0])
    s = torch.tensor([0.0, math.log(2.0)])
    c = torch.tensor([0.5, 1.0])
    # 0.5*2 + 1*0.5*3 + 0.5*(0 + log 2)
    assert uncertainty_objective(L, s, c).item() == pytest.approx(1 + 1.5 + 0.5 * math.log(2))
    torch.testing.assert_close(uncertainty_weights(s, c), torch.tensor([0.5, 0.5]))


def test_dwa_rule():
    prev, before = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])
    # r = (0.5, 1); w = 2 softmax(r / 2)
    e = [math.exp(0.25), math.exp(0.5)]
    expected = torch.tensor([2 * e[0] / sum(e), 2 * e[1] / sum(e)])
    torch.testing.assert_close(dwa_weights(prev, before, 2.0), expected)
    assert dwa_weights(None, prev) is None


def test_dwa_uses_epoch_averages_of_the_two_previous_epochs():
    # two steps per epoch; record the epoch-average losses and the weights of the third epoch
    strategy = DWA(temperature=2.0)
    seen = []

    class Probe(ScalarNet):
        def task_losses(self, batch, batch_idx):
            losses = super().task_losses(batch, batch_idx)
            seen.append((self.current_epoch, torch.stack(list(losses.values())).detach().clone()))
            return losses

    net = Probe(lr=0.01)
    trainer(max_epochs=3, callbacks=[strategy]).fit(net, dummy_loader(2))
    avg = {e: torch.stack([v for ep, v in seen if ep == e]).double().mean(0).float() for e in (0, 1)}
    expected = dwa_weights(avg[1], avg[0], 2.0)
    got = torch.tensor([strategy.weights[n] for n in ("t0", "t1")])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got.sum().item() == pytest.approx(2.0)


def test_rlw_draws_from_its_seeded_generator_once_per_step():
    strategy = RLW(seed=5)
    net = ScalarNet()
    trainer(max_steps=3, callbacks=[strategy]).fit(net, dummy_loader(3))
    g = torch.Generator().manual_seed(5)
    draws = [random_weights(2, g) for _ in range(3)]
    torch.testing.assert_close(torch.tensor(list(strategy.weights.values())), draws[-1])
    # weights lie on the simplex
    assert sum(strategy.weights.values()) == pytest.approx(1.0)


def test_rlw_constant_over_an_accumulation_window():
    strategy = RLW(seed=5)
    net = ScalarNet(accumulate_grad_batches=2)
    trainer(max_steps=1, callbacks=[strategy]).fit(net, dummy_loader(2))
    w = random_weights(2, torch.Generator().manual_seed(5))
    # both micro-batches use the same draw: θ1 = 1 - 0.1 * (w0*2 + w1*(-8))
    assert net.theta.item() == pytest.approx(1 - 0.1 * (w[0].item() * 2 - w[1].item() * 8), rel=1e-6)


@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet"])
def test_random_weights_simplex_and_reproducible(distribution):
    a = random_weights(5, torch.Generator().manual_seed(0), distribution)
    b = random_weights(5, torch.Generator().manual_seed(0), distribution)
    assert torch.equal(a, b)
    assert a.sum().item() == pytest.approx(1.0, abs=1e-6) and (a > 0).all()


def test_dirichlet_mean_is_uniform():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([random_weights(4, g, "dirichlet", concentration=2.0) for _ in range(2000)])
    torch.testing.assert_close(draws.mean(0), torch.full((4,), 0.25), atol=0.02, rtol=0)


@pytest.mark.parametrize("regularizer", ["log", "positive"])
def test_uncertainty_closed_form_gradient_matches_autograd(regularizer):
    from lightning_mtl.functional import uncertainty_objective_grad

    g = torch.Generator().manual_seed(0)
    losses = torch.rand(5, generator=g, dtype=torch.float64) * 3 + 0.1
    params = torch.randn(5, generator=g, dtype=torch.float64) + (2.0 if regularizer == "positive" else 0.0)
    params.requires_grad_(True)
    factors = torch.tensor([0.5, 1.0, 0.5, 1.0, 0.5], dtype=torch.float64)
    (auto,) = torch.autograd.grad(uncertainty_objective(losses, params, factors, regularizer), params)
    torch.testing.assert_close(
        uncertainty_objective_grad(losses, params.detach(), factors, regularizer), auto
    )


@pytest.mark.parametrize(
    "make_user",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=0.1),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, weight_decay=0.1),
    ],
)
def test_private_optimizer_matches_the_users_class_without_weight_decay(make_user, recwarn):
    class Net(ScalarNet):
        def configure_optimizers(self):
            return make_user(self.parameters())

    strategy = UncertaintyWeighting()  # optimizer="match", lr follows the model's
    net = Net()
    trainer(max_steps=2, callbacks=[strategy]).fit(net, dummy_loader(2))
    private = strategy._learnable.optimizer
    user = net.trainer.optimizers[0]
    assert type(private) is type(user)
    assert private.param_groups[0]["weight_decay"] == 0.0
    assert private.param_groups[0]["lr"] == user.param_groups[0]["lr"]
    assert not [w for w in recwarn if "Could not build a private" in str(w.message)]
