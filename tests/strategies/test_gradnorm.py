"""GradNorm: the objective's gradient by hand, the training rule against a plain-torch replica, DDP and
resume parity, accumulation, AMP and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    TinyNet,
    ddp_parity_records,
    flat_params,
    loader,
    make_data,
    trainer,
)
from torch import nn

from lightning_mtl.functional.gradnorm import (
    gradnorm_objective,
    gradnorm_targets,
    gradnorm_weight_grad,
    inverse_training_rates,
    renormalize_weights,
)
from lightning_mtl.strategies.gradnorm import GradNorm


# ---------------------------------------------------------------------------------------------- functional
def test_objective_and_gradient_by_hand():
    # w = (1, 2), n = (3, 1): G = (3, 2), Ḡ = 2.5. L = (2, 1), L(0) = (4, 4): L̃ = (.5, .25), r = (4/3, 2/3).
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    n = torch.tensor([3.0, 1.0])
    r = inverse_training_rates(torch.tensor([2.0, 1.0]), torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(r, torch.tensor([4 / 3, 2 / 3]))
    # α = 1: targets Ḡr = (10/3, 5/3); G − target = (−1/3, +1/3)
    torch.testing.assert_close(gradnorm_targets(w, n, r, 1.0), torch.tensor([10 / 3, 5 / 3]))
    objective = gradnorm_objective(w, n, r, 1.0)
    assert objective.item() == pytest.approx(2 / 3, abs=1e-6)
    (auto,) = torch.autograd.grad(objective, w)
    expected = torch.tensor([-3.0, 1.0])  # sign(G − target)·n, the target held constant
    torch.testing.assert_close(auto, expected)
    torch.testing.assert_close(gradnorm_weight_grad(w, n, r, 1.0), expected)
    # α = 2: targets 2.5·(16/9, 4/9) = (4.444, 1.111): G − target = (−1.444, +0.889)
    torch.testing.assert_close(gradnorm_weight_grad(w, n, r, 2.0), torch.tensor([-3.0, 1.0]))
    assert gradnorm_objective(w, n, r, 2.0).item() == pytest.approx(40 / 9 - 3 + 2 - 10 / 9, abs=1e-5)
    # α = 0: the targets are Ḡ for every task, whatever the rates
    torch.testing.assert_close(gradnorm_targets(w, n, r, 0.0), torch.tensor([2.5, 2.5]))


def test_target_is_constant_in_the_weights():
    # if the mean Ḡ were differentiated, the gradient would differ: (−3, 1) − (r₁·n₁/2·s₁ + ...) etc.
    w = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    n = torch.tensor([1.0, 2.0, 6.0])
    r = torch.ones(3)
    (g,) = torch.autograd.grad(gradnorm_objective(w, n, r, 1.5), w)
    torch.testing.assert_close(g, torch.tensor([-1.0, -2.0, 6.0]))  # Ḡ = 3: below, below, above


def test_renormalize_clamps_then_sums_to_T():
    w = renormalize_weights(torch.tensor([-1.0, 0.5, 2.5]), min_weight=1e-3)
    assert w.sum().item() == pytest.approx(3.0)
    assert (w > 0).all()
    torch.testing.assert_close(w / w[1], torch.tensor([1e-3 / 0.5, 1.0, 5.0]))


# ---------------------------------------------------------------------------------------------- the rule
def _replica(batches, steps, lr_model, lr_w, alpha, initial_loss_steps=1):
    """GradNorm in plain torch, with autograd on L_grad (not the closed form) and the paper's renormalisation."""
    model = TinyNet(lr=lr_model)
    layer = model.encoder[0].weight
    w = torch.ones(3, requires_grad=True)
    opt_w = torch.optim.SGD([w], lr=lr_w)
    opt = torch.optim.SGD(model.parameters(), lr=lr_model)
    history = []
    for step, batch in enumerate(batches[:steps]):
        losses = torch.stack(list(model.task_losses(batch, step).values()))
        rows = [torch.autograd.grad(losses[i], layer, retain_graph=True)[0].flatten() for i in range(3)]
        norms = torch.stack(rows).norm(dim=1)
        if step < initial_loss_steps:
            history.append(losses.detach())
        initial = torch.stack(history).mean(0)
        ratios = losses.detach() / initial
        rates = ratios / ratios.mean()
        G = w * norms
        target = (G.mean() * rates**alpha).detach()
        l_grad = (G - target).abs().sum()
        (gw,) = torch.autograd.grad(l_grad, w)
        opt.zero_grad()
        (w.detach() * losses).sum().backward()
        opt.step()
        w.grad = gw
        opt_w.step()
        with torch.no_grad():
            w.clamp_(min=1e-6)
            w.mul_(3 / w.sum())
    return model, w.detach()


@pytest.mark.parametrize("alpha, initial_loss_steps", [(1.5, 1), (0.5, 3)])
def test_matches_plain_torch_replica(alpha, initial_loss_steps):
    data = loader(make_data(n=64), batch_size=8)
    strategy = GradNorm(alpha=alpha, optimizer="sgd", lr=0.05, initial_loss_steps=initial_loss_steps)
    model = TinyNet(lr=0.02)
    trainer(max_epochs=1, callbacks=[strategy]).fit(model, data)
    ref_model, ref_w = _replica(list(data), 8, 0.02, 0.05, alpha, initial_loss_steps)
    # the network stepped on ∇ Σ wᵢLᵢ with detached w (L_grad never reached it), w on ∇_w L_grad only
    torch.testing.assert_close(flat_params(model), flat_params(ref_model), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(strategy.params.detach(), ref_w, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(ref_w, torch.ones(3)), "weights never moved: the test cannot fail"
    assert strategy.params.detach().sum().item() == pytest.approx(3.0, abs=1e-5)
    assert (strategy.params.detach() > 0).all()


def test_weights_get_no_gradient_from_the_network_loss_and_the_network_none_from_l_grad():
    model = TinyNet()
    strategy = GradNorm(optimizer="sgd", lr=0.1)
    t = trainer(max_steps=1, callbacks=[strategy])
    t.fit(model, loader(make_data(n=32)))
    # one step done; run one more backward by hand through the strategy and inspect the gradients
    from lightning_mtl.step import StepContext

    batch = next(iter(loader(make_data(n=32, seed=1))))
    model.zero_grad()
    strategy.params.grad = None
    losses = torch.stack(list(model.task_losses(batch, 0).values()))
    ctx = StepContext(model, losses, losses.detach(), 1, True, True)
    model.manual_backward = lambda loss, **kw: loss.backward(**kw)  # no trainer loop needed here
    w = strategy.params.detach().clone()
    strategy.backward(ctx)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    losses2 = torch.stack(list(model.task_losses(batch, 0).values()))
    expected = torch.autograd.grad((w * losses2).sum(), list(model.parameters()), retain_graph=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    # w's gradient is the closed form of L_grad, nothing from Σ wᵢLᵢ (whose w-gradient would be the losses)
    layer = model.encoder[0].weight
    norms = torch.stack(
        [torch.autograd.grad(losses2[i], layer, retain_graph=True)[0].norm() for i in range(3)]
    )
    rates = inverse_training_rates(losses2.detach(), strategy.initial_losses)
    torch.testing.assert_close(strategy.params.grad, gradnorm_weight_grad(w, norms, rates, 1.5))


def test_gradient_accumulation_equals_the_full_batch():
    ds = make_data(n=64)
    full, accumulated = GradNorm(optimizer="sgd", lr=0.05), GradNorm(optimizer="sgd", lr=0.05)
    m_full, m_acc = TinyNet(), TinyNet(accumulate_grad_batches=2)
    trainer(max_epochs=2, callbacks=[full]).fit(m_full, loader(ds, batch_size=16))
    trainer(max_epochs=2, callbacks=[accumulated]).fit(m_acc, loader(ds, batch_size=8))
    torch.testing.assert_close(flat_params(m_acc), flat_params(m_full), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(accumulated.params.detach(), full.params.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(accumulated.initial_losses, full.initial_losses, atol=1e-6, rtol=1e-6)


def test_layer_specs_and_metrics():
    ds = loader(make_data(n=32))
    default = GradNorm()
    trainer(max_steps=1, callbacks=[default]).fit(TinyNet(), ds)
    model = TinyNet()
    assert default.resolve_layer(model) == [model.encoder[0].weight]  # last shared matrix, not the bias
    by_name = GradNorm(layer="encoder.0.weight").resolve_layer(model)
    assert by_name == [model.encoder[0].weight]
    by_module = GradNorm(layer="encoder.0").resolve_layer(model)
    assert by_module == [model.encoder[0].weight, model.encoder[0].bias]
    by_callable = GradNorm(layer=lambda m: m.encoder[0].bias).resolve_layer(model)
    assert by_callable == [model.encoder[0].bias]
    metrics = default.extra_metrics()
    assert set(metrics) == {
        "train/gradnorm/loss_grad",
        *(f"train/gradnorm/grad_norm/{t}" for t in "abc"),
        *(f"train/gradnorm/inverse_rate/{t}" for t in "abc"),
    }
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert default.weights is not None and set(default.weights) == {"a", "b", "c"}


def test_weights_are_logged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    t = trainer(max_steps=4, callbacks=[GradNorm()], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    t.fit(TinyNet(), loader(make_data(n=64)))
    assert {"train/weight/a", "train/gradnorm/grad_norm/b", "train/gradnorm/loss_grad"} <= set(
        t.logged_metrics
    )


def test_skipped_step_leaves_weights_unchanged():
    strategy = GradNorm(lr=0.5)
    model = TinyNet()
    t = trainer(max_steps=2, callbacks=[strategy])
    t.fit(model, loader(make_data(n=32)))
    before = strategy.params.detach().clone()
    strategy._learnable.accumulate(torch.tensor([1.0, -1.0, 0.0]))
    strategy.on_optimizer_step(model, skipped=True)
    torch.testing.assert_close(strategy.params.detach(), before)
    assert strategy.params.grad is None


def test_amp_fp16_scaler_gives_unscaled_norms():
    from lightning.pytorch.plugins import MixedPrecision

    ds = loader(make_data(n=64))
    fp32, amp = GradNorm(), GradNorm()
    trainer(max_steps=1, callbacks=[fp32]).fit(TinyNet(), ds)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=512.0))
    trainer(max_steps=1, callbacks=[amp], plugins=[plugin]).fit(TinyNet(), ds)
    for key, value in fp32.extra_metrics().items():
        # the norms are of the unscaled gradients (the scale is 512): equal up to fp16 rounding
        assert float(amp.extra_metrics()[key]) == pytest.approx(float(value), rel=2e-2), key
    assert not torch.equal(amp.params.detach(), torch.ones(3))


def test_amp_overflow_step_skips_the_weight_update():
    from lightning.pytorch.plugins import MixedPrecision

    # the default scale 65536 overflows fp16 on this model's first step: the scaler skips it, so must GradNorm
    scaler = torch.amp.GradScaler("cpu")
    strategy = GradNorm(lr=0.5)
    model = TinyNet()
    before = flat_params(model)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer(max_steps=1, callbacks=[strategy], plugins=[plugin]).fit(model, loader(make_data(n=64)))
    assert scaler.get_scale() < 65536.0, "the scaler did not skip: the test cannot tell"
    torch.testing.assert_close(flat_params(model), before)
    torch.testing.assert_close(strategy.params.detach(), torch.ones(3))


# ---------------------------------------------------------------------------------------------- DDP
B = 8
EPOCHS = 2


@pytest.mark.ddp_extra  # GradNorm's DDP parity with uneven label counts (test_partial_gradient_strategies.py) runs
@pytest.mark.timeout(240)
def test_ddp_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    single, rank0, rank1 = ddp_parity_records(
        tmp_path,
        lambda: GradNorm(alpha=1.5, optimizer="adam", lr=0.05, initial_loss_steps=2),
        epochs=EPOCHS,
        batch_size=B,
        tag="gradnorm",
    )
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, abs=1e-5), task
    assert any(abs(w - 1) > 1e-2 for w in single["weights"].values()), "weights never moved"
    torch.testing.assert_close(
        rank0["state"]["state"]["initial_sum"], single["state"]["state"]["initial_sum"], atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------------------------------------- resume
def test_resume_matches_uninterrupted(tmp_path):
    data = loader(make_data(n=48), batch_size=12)

    def make():
        return GradNorm(alpha=1.0, optimizer="adam", lr=0.05, initial_loss_steps=3)

    straight, s_straight = TinyNet(optimizer="adam", lr=0.01), make()
    trainer(max_epochs=4, callbacks=[s_straight]).fit(straight, data)

    first = TinyNet(optimizer="adam", lr=0.01)
    t1 = trainer(max_epochs=2, callbacks=[make()])
    t1.fit(first, data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=True)  # tensors and primitives only
    assert any("GradNorm" in k for k in ckpt["callbacks"])

    resumed, s_resumed = TinyNet(optimizer="adam", lr=0.01), make()
    trainer(max_epochs=4, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.params.detach(), s_straight.params.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.initial_losses, s_straight.initial_losses)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(alpha=-0.5), ValueError, "alpha must be a finite number >= 0.*-0.5"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(layer=3), TypeError, "layer must be None, a parameter name"),
        (dict(layer=""), ValueError, "empty string"),
        (dict(initial_loss_steps=0), ValueError, "initial_loss_steps must be an int >= 1, got 0"),
        (dict(lr=-1.0), ValueError, "lr must be > 0"),
        (dict(optimizer="rmsprop"), ValueError, "optimizer must be"),
        (dict(jacobian="fast"), ValueError, "jacobian must be"),
        (dict(min_weight=0.0), ValueError, "min_weight"),
    ],
)
def test_bad_hyper_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradNorm(**kwargs)


class NoSharedNet(TinyNet):
    def shared_parameters(self):
        return None


class NegativeLossNet(TinyNet):
    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        return {**losses, "b": losses["b"] - 1e6}


@pytest.mark.parametrize(
    "model, layer, error, match",
    [
        (NoSharedNet, None, ValueError, r"shared_parameters\(\) returns None.*layer="),
        (TinyNet, "encoder.7", ValueError, r"layer='encoder.7' is neither a parameter name nor a sub-module"),
        (TinyNet, "heads.a", RuntimeError, r"task\(s\) \['b', 'c'\].*does not go through it"),
        (NegativeLossNet, None, ValueError, r"positive task losses.*'b'"),
    ],
)
def test_bad_layer_or_model(model, layer, error, match):
    with pytest.raises(error, match=match):
        trainer(max_steps=1, callbacks=[GradNorm(layer=layer)]).fit(model(), loader(make_data(n=32)))


def test_frozen_layer_is_rejected():
    model = TinyNet()
    model.encoder[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        GradNorm(layer="encoder.0.weight").resolve_layer(model)


def test_callable_returning_non_parameters():
    with pytest.raises(TypeError, match="callable must return a parameter"):
        GradNorm(layer=lambda m: ["encoder"]).resolve_layer(nn.Linear(2, 2))
