"""Regularisers (issue 9, part 4): the protocol (terms added once, in the strategy's single backward) and
OrthogonalGradients (Suteu & Guo, arXiv:1912.06844): hand-computed value and step, finite differences,
composition with loss-based, learnable and gradient strategies under accumulation, the gradient-conflict
monitor, AMP, and DDP (per-rank penalty: the update is the mean of the ranks' penalised updates)."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    RecordState,
    TinyNet,
    dummy_loader,
    flat_params,
    load_record,
    loader,
    make_data,
    restore_environ,
    trainer,
)
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.callbacks.gradient_conflict import GradientConflictMonitor
from lightning_mtl.regularizers.base import MTLRegularizer
from lightning_mtl.regularizers.orthogonal import (
    OrthogonalGradients,
    gradient_cosines,
    orthogonality_penalty,
    task_gramian,
)
from lightning_mtl.step import StepContext
from lightning_mtl.strategies.base import MTLStrategy
from lightning_mtl.strategies.equal import EqualWeighting
from lightning_mtl.strategies.gradnorm import GradNorm
from lightning_mtl.strategies.pcgrad import PCGrad
from lightning_mtl.strategies.uncertainty import UncertaintyWeighting


class VecNet(MultiTaskModule):
    """Shared ``θ ∈ ℝ²``; task i has loss ½‖θ − tᵢ‖², so gᵢ = θ − tᵢ: a hand-computable penalty."""

    def __init__(self, theta=(1.0, 1.0), targets=((0.0, 1.0), (0.0, 0.0)), lr: float = 0.1, **kwargs: Any):
        kwargs.setdefault("tasks", [f"t{i}" for i in range(len(targets))])
        super().__init__(**kwargs)
        self.theta = nn.Parameter(torch.tensor(theta))
        self.targets = torch.tensor(targets)
        self.lr = lr

    def shared_parameters(self):
        return [self.theta]

    def task_losses(self, batch, batch_idx):
        return {n: 0.5 * (self.theta - self.targets[i]).square().sum() for i, n in enumerate(self.task_names)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


# ------------------------------------------------------------------------------------------ the math
def test_penalty_hand_computed_two_tasks():
    # g₁ = (1, 0), g₂ = (1, 1): ⟨g₁, g₂⟩ = 1, ‖g₁‖ = 1, ‖g₂‖ = √2, cos = 1/√2, cos² = ½; λ = 0.2 → 0.1
    theta = torch.tensor([1.0, 1.0], requires_grad=True)
    losses = torch.stack([theta[0], theta.sum()])  # ∇ = (1, 0) and (1, 1)
    G = task_gramian(losses, [theta])
    torch.testing.assert_close(G, torch.tensor([[1.0, 1.0], [1.0, 2.0]]))
    torch.testing.assert_close(gradient_cosines(G)[0, 1], torch.tensor(1 / math.sqrt(2)))
    torch.testing.assert_close(orthogonality_penalty(G, 0.2), torch.tensor(0.1))
    # three tasks, g₃ = (0, 1): cos₁₂² = ½, cos₁₃² = 0, cos₂₃² = ½ → sum 1, mean over the 3 pairs ⅓
    G3 = task_gramian(torch.stack([theta[0], theta.sum(), theta[1]]), [theta])
    torch.testing.assert_close(orthogonality_penalty(G3, 1.0, "sum"), torch.tensor(1.0))
    torch.testing.assert_close(orthogonality_penalty(G3, 1.0, "mean"), torch.tensor(1 / 3))
    # the AMP scale cancels: gradients of s·L divided by s
    torch.testing.assert_close(task_gramian(losses, [theta], scale=1024.0), G)


def test_zero_gradient_has_cosine_zero_and_a_finite_derivative():
    theta = torch.tensor([1.0, 1.0], requires_grad=True)
    losses = torch.stack([theta[0] ** 2, (theta[1] - 1.0) ** 2])  # g₂ = (0, 2(θ₂ − 1)) = 0 at θ₂ = 1
    G = task_gramian(losses, [theta])
    assert gradient_cosines(G)[0, 1].item() == 0.0
    penalty = orthogonality_penalty(G, 1.0)
    (grad,) = torch.autograd.grad(penalty, theta)
    assert penalty.item() == 0.0 and bool(torch.isfinite(grad).all())
    # a task that does not reach the shared parameters at all: zero row, cosine 0
    other = torch.zeros((), requires_grad=True)
    G = task_gramian(torch.stack([theta.sum(), other * 2]), [theta])
    assert G[1].abs().sum().item() == 0.0
    assert orthogonality_penalty(G, 1.0).item() == 0.0


def test_penalty_gradient_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)
    W2 = torch.randn(4, 3, dtype=torch.float64)

    def penalty(W1: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(x @ W1)  # shared: W1 [3, 4]; heads: the columns of W2
        losses = ((z @ W2 - y) ** 2).mean(0)  # [3] tasks
        return orthogonality_penalty(task_gramian(losses, [W1]), 0.7)

    W1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert penalty(W1).item() > 1e-3  # not trivially zero
    assert torch.autograd.gradcheck(penalty, (W1,), eps=1e-6, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ a step through Lightning
def test_hand_computed_step_with_equal_weighting():
    # θ = (1, 1), t₁ = (0, 1), t₂ = (0, 0): g₁ = (1, 0), g₂ = (1, 1), cos = 1/√2.
    # ∇_θ cos = [v/(‖u‖‖v‖) − cos·u/‖u‖²] + [u/(‖u‖‖v‖) − cos·v/‖v‖²] with u = g₁, v = g₂ (∂gᵢ/∂θ = I)
    #   first bracket:  (1, 1)/√2 − (1/√2)(1, 0)     = (0, 0.70711)
    #   second bracket: (1, 0)/√2 − (1/√2)(1, 1)/2   = (0.35355, −0.35355)
    #   ∇_θ cos = (0.35355, 0.35355)
    # ∇ cos² = 2 cos ∇cos = (0.5, 0.5); λ = 0.2 → (0.1, 0.1). Equal weighting: g₁ + g₂ = (2, 1).
    # SGD, lr 0.1: θ' = (1, 1) − 0.1·(2.1, 1.1) = (0.79, 0.89). Logged penalty: λ·½ = 0.1.
    net = VecNet()
    t = trainer(max_steps=1, callbacks=[OrthogonalGradients(weight=0.2)])
    t.fit(net, dummy_loader(1))
    torch.testing.assert_close(net.theta.detach(), torch.tensor([0.79, 0.89]))
    assert t.callback_metrics["train/orthogonal/penalty"].item() == pytest.approx(0.1, abs=1e-6)


def test_absent_task_is_left_out_of_the_pairs():
    # partial labels: task t2 has no label this step, so only (t0, t1) is a pair: the hand-computed step again
    class Partial(VecNet):
        def __init__(self) -> None:
            super().__init__(
                targets=((0.0, 1.0), (0.0, 0.0), (5.0, 5.0)), tasks=["t0", "t1", Task("t2", partial=True)]
            )

        def task_losses(self, batch, batch_idx):
            losses = super().task_losses(batch, batch_idx)
            del losses["t2"]
            return losses

    net = Partial()
    t = trainer(max_steps=1, callbacks=[OrthogonalGradients(weight=0.2)])
    t.fit(net, dummy_loader(1))
    torch.testing.assert_close(net.theta.detach(), torch.tensor([0.79, 0.89]))
    assert t.callback_metrics["train/orthogonal/penalty"].item() == pytest.approx(0.1, abs=1e-6)


def test_zero_weight_is_a_no_op_and_weights_add_up():
    def fit(*callbacks: Any) -> torch.Tensor:
        net = TinyNet()
        trainer(max_epochs=1, callbacks=list(callbacks)).fit(net, loader(make_data(n=32), batch_size=8))
        return flat_params(net)

    plain = fit()
    assert torch.equal(fit(OrthogonalGradients(weight=0.0)), plain)
    one = fit(OrthogonalGradients(weight=0.3))
    assert not torch.allclose(one, plain)
    # two regularisers, both added in the same backward: λ = 0.1 + 0.2 ≡ λ = 0.3
    torch.testing.assert_close(fit(OrthogonalGradients(weight=0.1), OrthogonalGradients(weight=0.2)), one)


def _theta_after_one_window(strategy_factory, reg: float | None, k: int) -> torch.Tensor:
    net = VecNet(accumulate_grad_batches=k)
    callbacks: list[Any] = [strategy_factory()]
    if reg is not None:
        callbacks.append(OrthogonalGradients(weight=reg))
    trainer(max_steps=1, callbacks=callbacks).fit(net, dummy_loader(k))
    return net.theta.detach()


@pytest.mark.parametrize(
    "make",
    [EqualWeighting, UncertaintyWeighting, GradNorm, lambda: PCGrad(seed=0)],
    ids=["equal", "uncertainty", "gradnorm", "pcgrad"],
)
@pytest.mark.parametrize("k", [1, 2])
def test_composes_once_per_micro_batch(make, k):
    # Both micro-batches of the window are identical (θ does not move inside a window), so the window's update
    # with the regulariser differs from the strategy's alone by exactly −lr·∇(λ·cos²) = −0.1·(0.1, 0.1) (see
    # the hand-computed step): the term is back-propagated once per micro-batch and divided by k, like the
    # losses. Twice would give −0.02, once per window −0.005 with k = 2.
    # Loss-based strategies (and GradNorm) back-propagate every micro-batch; PCGrad once, at the window's end.
    with_reg = _theta_after_one_window(make, 0.2, k)
    without = _theta_after_one_window(make, None, k)
    torch.testing.assert_close(with_reg - without, torch.tensor([-0.01, -0.01]), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "make",
    [EqualWeighting, UncertaintyWeighting, lambda: PCGrad(seed=0)],
    ids=["equal", "uncertainty", "pcgrad"],
)
def test_fit_trains_with_accumulation(make):
    net = TinyNet(accumulate_grad_batches=2)
    reg = OrthogonalGradients(weight=0.1)
    t = trainer(max_epochs=3, callbacks=[make(), reg])
    data = loader(make_data(n=64), batch_size=8)
    before = _total_loss(net, data)
    t.fit(net, data)
    assert _total_loss(net, data) < before
    assert bool(torch.isfinite(flat_params(net)).all())
    assert math.isfinite(t.callback_metrics["train/orthogonal/penalty"].item())
    assert reg.last_cosines is not None and reg.last_cosines.shape == (3, 3)


def _total_loss(net: MultiTaskModule, data: DataLoader) -> float:
    with torch.no_grad():
        return sum(sum(v.item() for v in net.task_losses(b, 0).values()) for b in data)


def test_bf16_and_fp16_runs_match_fp32():
    def fit(**kwargs: Any) -> torch.Tensor:
        net = TinyNet()
        trainer(max_epochs=2, callbacks=[OrthogonalGradients(weight=0.5)], **kwargs).fit(
            net, loader(make_data(n=64), batch_size=16)
        )
        return flat_params(net)

    fp32 = fit()
    fp16 = fit(
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))]
    )
    torch.testing.assert_close(fp16, fp32, atol=2e-3, rtol=2e-3)
    bf16 = fit(precision="bf16-mixed")
    assert bool(torch.isfinite(bf16).all())
    torch.testing.assert_close(bf16, fp32, atol=3e-2, rtol=3e-2)


def test_resume_matches_uninterrupted(tmp_path):
    # stateless, but the resumed run must rebuild it (shared parameters, no stale queued term) identically
    data = loader(make_data(n=64), batch_size=8)

    def make() -> list[Any]:
        return [
            PCGrad(seed=0),
            OrthogonalGradients(weight=0.5),
            OrthogonalGradients(weight=0.1, reduction="mean"),
        ]

    full = TinyNet(accumulate_grad_batches=2)
    trainer(max_epochs=4, callbacks=make()).fit(full, data)
    half = TinyNet(accumulate_grad_batches=2)
    t1 = trainer(max_epochs=2, callbacks=make())
    t1.fit(half, data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed = TinyNet(accumulate_grad_batches=2)
    trainer(max_epochs=4, callbacks=make()).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(full), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ the test
class CorrelatedNet(MultiTaskModule):
    """Two regression tasks whose targets are nearly the same function of x: their gradients on the shared
    encoder start strongly aligned (cos ≈ 1)."""

    def __init__(self) -> None:
        super().__init__(tasks=["a", "b"])
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in self.task_names})
        with torch.no_grad():  # the heads start identical: the task gradients start (almost) parallel
            self.heads["b"].load_state_dict(self.heads["a"].state_dict())

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        return {t: nn.functional.mse_loss(self.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate("ab")}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _correlated_data(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, generator=g)
    a = x @ w
    b = a + 0.3 * (x @ torch.randn(6, generator=g))  # correlated with a (cos of the targets ≈ 0.95)
    return TensorDataset(x, torch.stack([a, b], 1))


class AbsCosine(pl.Callback):
    """Mean |cos| of the monitor's measurements (it keeps the signed mean only)."""

    def __init__(self, monitor: GradientConflictMonitor) -> None:
        self.monitor, self.values = monitor, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last = self.monitor.last
        if last is not None and last["step"] == trainer.global_step - 1:
            self.values.append(abs(float(last["cosine"][0, 1])))


def _mean_abs_cos(regularize: bool) -> tuple[float, float]:
    monitor = GradientConflictMonitor(every_n_steps=1, log_heatmap=False)
    recorder = AbsCosine(monitor)
    callbacks: list[Any] = [monitor, recorder]
    if regularize:
        callbacks.append(OrthogonalGradients(weight=1.0))
    trainer(max_epochs=8, callbacks=callbacks).fit(CorrelatedNet(), loader(_correlated_data(), batch_size=16))
    assert len(recorder.values) == 8 * 8
    return sum(recorder.values) / len(recorder.values), recorder.values[0]


def test_monitor_measures_lower_mean_abs_cosine_with_the_regulariser():
    plain, plain_first = _mean_abs_cos(False)
    regularized, reg_first = _mean_abs_cos(True)
    # measured: |cos| 0.84 at the first step in both runs; mean |cos| 0.52 without, 0.32 with (λ = 1)
    assert plain_first > 0.7 and reg_first == pytest.approx(plain_first)  # correlated at the start
    assert regularized < plain - 0.1, (regularized, plain)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=-1.0), "weight=-1.0"),
        (dict(weight=float("nan")), "weight=nan"),
        (dict(weight="0.1"), "weight='0.1'"),
        (dict(reduction="max"), "reduction='max'"),
        (dict(eps=0.0), "eps=0.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OrthogonalGradients(**kwargs)


def test_needs_a_multitask_module():
    class Plain(pl.LightningModule):
        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(TypeError, match="MultiTaskModule"):
        OrthogonalGradients().setup(trainer(), Plain(), "fit")


def test_needs_shared_parameters():
    class NoShared(TinyNet):
        def shared_parameters(self):
            return None

    with pytest.raises(ValueError, match="OrthogonalGradients needs the shared parameters"):
        trainer(max_steps=1, callbacks=[OrthogonalGradients()]).fit(NoShared(), loader(make_data(n=16)))


def test_a_strategy_that_bypasses_ctx_backward_is_an_error():
    class Bypass(MTLStrategy):
        def backward(self, ctx: StepContext) -> None:
            ctx.module.manual_backward(ctx.losses.sum())

    with pytest.raises(RuntimeError, match="never back-propagated"):
        trainer(max_steps=1, callbacks=[Bypass(), OrthogonalGradients()]).fit(VecNet(), dummy_loader(1))


def test_custom_regularizer_term_is_added_once():
    class L2(MTLRegularizer):
        log_key = "train/l2"

        def term(self, ctx):
            return 0.5 * ctx.module.theta.square().sum()  # ∇ = θ

    # θ = (1, 1): equal weighting (2, 1) + θ (1, 1) = (3, 2); θ' = (1, 1) − 0.1·(3, 2) = (0.7, 0.8)
    net = VecNet()
    t = trainer(max_steps=1, callbacks=[L2()])
    t.fit(net, dummy_loader(1))
    torch.testing.assert_close(net.theta.detach(), torch.tensor([0.7, 0.8]))
    assert t.callback_metrics["train/l2"].item() == pytest.approx(1.0)

    class Vector(MTLRegularizer):
        def term(self, ctx):
            return ctx.losses

    with pytest.raises(ValueError, match="must return a scalar tensor or None"):
        trainer(max_steps=1, callbacks=[Vector()]).fit(VecNet(), dummy_loader(1))


# ------------------------------------------------------------------------------------------ DDP
def _simulated_per_rank(ds: TensorDataset, epochs: int, batch_size: int, weight: float) -> torch.Tensor:
    """What the documented DDP semantics give: each rank penalises its own batch's gradients, DDP averages the
    ranks' gradients of ``Σ Lᵢ + λΣcos²``; the ranks' batches are those of Lightning's DistributedSampler
    (shuffle, seed 0, ``set_epoch``): rank r takes ``perm[r::2]``."""
    net = TinyNet()
    params = list(net.parameters())
    shared = list(net.shared_parameters())
    for epoch in range(epochs):
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(epoch)).tolist()
        shards = [perm[r::2] for r in range(2)]
        for k in range(len(shards[0]) // batch_size):
            grads = [torch.zeros_like(p) for p in params]
            for shard in shards:
                idx = shard[k * batch_size : (k + 1) * batch_size]
                batch = (ds.tensors[0][idx], ds.tensors[1][idx])
                losses = torch.stack(list(net.task_losses(batch, k).values()))
                total = losses.sum() + orthogonality_penalty(task_gramian(losses, shared), weight)
                for g, d in zip(grads, torch.autograd.grad(total, params)):
                    g += d / 2
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= net.lr * g
    return flat_params(net)


@pytest.mark.timeout(300)
def test_ddp_per_rank_penalty_trains_and_keeps_ranks_identical(tmp_path):
    ds = make_data(n=64)
    with restore_environ():
        os.environ.pop("PL_GLOBAL_SEED", None)
        out = tmp_path / "ddp"
        out.mkdir()
        trainer(
            strategy="ddp_spawn",
            devices=2,
            max_epochs=3,
            callbacks=[OrthogonalGradients(weight=0.5), RecordState(str(out))],
        ).fit(TinyNet(), DataLoader(ds, batch_size=8))
        rank0, rank1 = load_record(str(out), 0), load_record(str(out), 1)
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["global_step"] == 12
    initial = flat_params(TinyNet())
    assert not torch.allclose(rank0["params"], initial)
    # the update is the mean of the ranks' penalised updates (each rank's cosines of its own gradients)
    expected = _simulated_per_rank(ds, epochs=3, batch_size=8, weight=0.5)
    torch.testing.assert_close(rank0["params"], expected, atol=1e-5, rtol=1e-5)
    # and not the same as without the penalty
    assert not torch.allclose(
        expected, _simulated_per_rank(ds, epochs=3, batch_size=8, weight=0.0), atol=1e-4
    )


# ------------------------------------------------------------------------------------------ the example
def test_example_runs():
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "orthogonal_gradients.py"))
    results = example["main"](["--epochs", "1", "--strategy", "PCGrad", "--accumulate", "2"])
    without, with_reg = results.values()
    assert with_reg["penalty"] is not None and math.isfinite(with_reg["penalty"])
    assert with_reg["mean_abs_cos"] < without["mean_abs_cos"]
