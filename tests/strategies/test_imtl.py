"""IMTL-L (``IMTLL``) and the hybrid IMTL (``IMTL``), Liu et al. ICLR 2021: hand-computed steps, the
impartiality property, TorchJD's IMTL-L, resume, accumulation and bad input. DDP parity: test_imtl_ddp.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import RepTinyNet, ScalarNet, TinyNet, dummy_loader, flat_params, loader, make_data, trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_mtl.cli.registry import make_strategy
from lightning_mtl.strategies import IMTL, IMTLG, IMTLL

LR = 0.05
N = 16


class ConflictNet(RepTinyNet):
    """TinyNet (marking its representation) whose task c is trained towards −2 × task a's target."""

    def task_losses(self, batch, batch_idx):
        x, y = batch
        y = torch.stack([y[:, 0], y[:, 1], 3 * y[:, 0]], 1)
        return super().task_losses((x, y), batch_idx)


def _per_task(model: TinyNet, batch, representation: bool):
    """Per-task gradients of every parameter (one plain autograd call per task), the shared rows (or the
    representation's), the losses, and the number of shared parameters."""
    x, y = batch
    y = torch.stack([y[:, 0], y[:, 1], 3 * y[:, 0]], 1)
    z = model.encoder(x)
    losses = torch.stack(
        [nn.functional.mse_loss(model.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate("abc")]
    )
    params = list(model.parameters())
    n_shared = sum(p.numel() for p in model.encoder.parameters())
    full, rep = [], []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        full.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])
        )
        rep.append(torch.autograd.grad(loss, z, retain_graph=True)[0].flatten())
    full = torch.stack(full)
    J = torch.stack(rep) if representation else full[:, :n_shared]
    return full, J, losses.detach(), n_shared


def _split(vector, module):
    out, offset = [], 0
    for p in module.parameters():
        out.append(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


# ------------------------------------------------------------------------------------------ IMTL-L
def test_imtll_hand_computed_steps():
    """ScalarNet: L₀ = (θ − 0)², L₁ = 2(θ − 3)², θ = 1, SGD lr 0.1 (s follows it: optimizer="match").

    Step 1 (s = 0): weights 1, ∂θ = 2θ + 4(θ − 3) = −6, θ → 1.6; ∂s = e^{s}L − 1 = (0, 7), s → (0, −0.7).
    Step 2: weights (1, e^{−0.7}), L = (2.56, 3.92), ∂θ = 3.2 − 5.6e^{−0.7}; ∂s = (1.56, 3.92e^{−0.7} − 1)."""
    strategy = IMTLL()
    net = ScalarNet(lr=0.1)
    trainer(max_epochs=-1, max_steps=1, callbacks=[strategy]).fit(net, dummy_loader(4))
    assert net.theta.item() == pytest.approx(1.6, abs=1e-6)
    torch.testing.assert_close(strategy.log_scales, torch.tensor([0.0, -0.7]))
    torch.testing.assert_close(strategy.weights_tensor(), torch.tensor([1.0, math.exp(-0.7)]))
    assert strategy.objective(torch.tensor([2.0, 1.0])).item() == pytest.approx(2 + math.exp(-0.7) + 0.7)

    strategy = IMTLL()
    net = ScalarNet(lr=0.1)
    trainer(max_epochs=-1, max_steps=2, callbacks=[strategy]).fit(net, dummy_loader(4))
    e = math.exp(-0.7)
    assert net.theta.item() == pytest.approx(1.6 - 0.1 * (3.2 - 5.6 * e), abs=1e-6)
    torch.testing.assert_close(strategy.log_scales, torch.tensor([-0.156, -0.7 - 0.1 * (3.92 * e - 1)]))
    assert set(strategy.extra_metrics()) == {"train/imtl_l/s/t0", "train/imtl_l/s/t1"}


def test_imtll_equals_torchjd_scalarizer():
    """Differential: TorchJD 0.18's IMTLL (s in the model's SGD) on the same model, data and learning rate."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    data = make_data(n=48)
    ours, strategy = TinyNet(lr=LR), IMTLL()
    trainer(max_epochs=2, callbacks=[strategy]).fit(ours, loader(data, batch_size=12))

    ref = TinyNet(lr=LR)
    scalarizer = scalarization.IMTLL(3)
    optimizer = torch.optim.SGD([*ref.parameters(), *scalarizer.parameters()], lr=LR)
    for _ in range(2):
        for x, y in loader(data, batch_size=12):
            z = ref.encoder(x)
            losses = torch.stack(
                [nn.functional.mse_loss(ref.heads[t](z).squeeze(1), y[:, i]) for i, t in enumerate("abc")]
            )
            optimizer.zero_grad()
            scalarizer(losses).backward()
            optimizer.step()
    torch.testing.assert_close(flat_params(ours), flat_params(ref), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(strategy.log_scales, scalarizer.log_scale.detach(), atol=1e-6, rtol=1e-5)
    assert strategy.log_scales.abs().min() > 1e-3, "s never moved: the test would not see a wrong gradient"


# ------------------------------------------------------------------------------------------ IMTL
def test_imtl_alpha_of_a_hand_built_two_task_gramian():
    """g₁ = (1, 0), g₂ = (1, 1), s = (0, log 2): scaled gradients g₁' = (1, 0), g₂' = (2, 2). Equal projections
    of d = α₁g₁' + α₂g₂' on u₁ = (1, 0) and u₂ = (1, 1)/√2 with α₁ + α₂ = 1: α₁ + 2α₂ = (α₁ + 4α₂)/√2, so
    α₁ = 2√2·α₂: α = (2√2, 1)/(1 + 2√2); the weights on the unscaled gradients are w = α·e^{s}."""
    strategy = IMTL()
    J = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    strategy._scale = torch.tensor([1.0, 2.0])
    w = strategy.compute_weights(J @ J.T, torch.ones(2))
    r = 2 * math.sqrt(2)
    alpha = torch.tensor([r, 1.0], dtype=torch.float64) / (1 + r)
    torch.testing.assert_close(strategy.alpha, alpha.float())
    torch.testing.assert_close(w, alpha * torch.tensor([1.0, 2.0], dtype=torch.float64))
    d = w @ J  # = α₁g₁' + α₂g₂'
    u = (J * torch.tensor([[1.0], [2.0]], dtype=torch.float64)) / torch.tensor([[1.0], [2 * math.sqrt(2)]])
    projections = u @ d
    torch.testing.assert_close(projections[0], projections[1])
    # with s = 0 it is IMTL-G
    strategy._scale = torch.ones(2)
    torch.testing.assert_close(
        strategy.compute_weights(J @ J.T, torch.ones(2)), IMTLG().compute_weights(J @ J.T, None)
    )


@pytest.mark.parametrize("representation", [False, True])
def test_imtl_two_steps_equal_a_manual_autograd_computation(representation):
    """Two SGD steps of IMTL (s moves after the first) against per-task autograd gradients: shared part
    Σαᵢe^{sᵢ}gᵢ with α from TorchJD's IMTL-G weighting of the scaled gradients' Gramian, heads Σe^{sᵢ}∇Lᵢ,
    s ← s − lr(e^{s}L − 1); after each step the shared update has equal projections on every unit scaled
    gradient (the paper's impartiality)."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    mode = "representation" if representation else "parameters"
    model = ConflictNet(lr=LR)
    expected = copy.deepcopy(model)
    data = make_data(n=2 * N)
    s = torch.zeros(3)
    alphas = []
    for step in range(2):
        full, J, losses, n_shared = _per_task(expected, data[step * N : (step + 1) * N], representation)
        scale = s.exp()
        Js = scale[:, None] * J.double()  # gradients of the scaled losses
        alpha = aggregation.IMTLGWeighting()(Js @ Js.T).float()
        alphas.append(alpha)
        last_scale = scale
        grad = (scale[:, None] * full).sum(0)  # heads: Σ e^{sᵢ}∇Lᵢ
        if representation:
            x = data[step * N : (step + 1) * N][0]
            z = expected.encoder(x)
            combined = (alpha * scale) @ J
            enc = torch.autograd.grad(
                z, list(expected.encoder.parameters()), grad_outputs=combined.view_as(z)
            )
            grad[:n_shared] = torch.cat([g.flatten() for g in enc])
        else:
            grad[:n_shared] = (alpha * scale) @ full[:, :n_shared]
        # impartiality: the combined (shared) gradient has equal projections on every unit scaled gradient
        d = (alpha.double() * scale.double()) @ J.double()
        units = Js / Js.norm(dim=1, keepdim=True)
        projections = units @ d
        torch.testing.assert_close(projections, projections[:1].expand(3), rtol=1e-6, atol=1e-9)
        with torch.no_grad():
            for p, g in zip(expected.parameters(), _split(grad, expected)):
                p -= LR * g
        s = s - LR * (scale * losses - 1)
    assert not torch.allclose(alphas[0], alphas[1], atol=1e-4)
    assert alphas[1].min() < 0.3 and s.abs().max() > 1e-2, "the test would not see s or α wrong"

    strategy = IMTL(mode=mode)
    trainer(max_steps=2, callbacks=[strategy]).fit(model, loader(data, batch_size=N))
    torch.testing.assert_close(strategy.log_scales, s, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(strategy.alpha, alphas[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(strategy.weights_tensor(), alphas[1] * last_scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_params(model), flat_params(expected), atol=1e-6, rtol=1e-5)
    assert strategy.alpha.sum().item() == pytest.approx(1.0, abs=1e-6)
    metrics = strategy.extra_metrics()
    assert {"train/imtl/s/a", "train/imtl/alpha/c", "train/grad/cos_min"} <= set(metrics)


@pytest.mark.parametrize("representation", [False, True])
def test_imtl_accumulation_equals_the_large_batch(representation):
    mode = "representation" if representation else "parameters"
    big, small = ConflictNet(), ConflictNet(accumulate_grad_batches=2)
    s_big, s_small = IMTL(mode=mode), IMTL(mode=mode)
    trainer(max_epochs=2, callbacks=[s_big]).fit(big, loader(make_data(n=64), batch_size=16))
    trainer(max_epochs=2, callbacks=[s_small]).fit(small, loader(make_data(n=64), batch_size=8))
    torch.testing.assert_close(s_small.log_scales, s_big.log_scales, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s_small.weights_tensor(), s_big.weights_tensor(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_params(small), flat_params(big), atol=1e-6, rtol=1e-5)


def test_imtl_update_every_reuses_w_and_gives_the_heads_the_current_scales():
    """update_every=2: the second step reuses w of the first for the shared part; heads get e^{s₂}∇Lᵢ."""
    model = ConflictNet(lr=LR)
    expected = copy.deepcopy(model)
    data = make_data(n=2 * N)
    s, w = torch.zeros(3), None
    for step in range(2):
        full, J, losses, n_shared = _per_task(expected, data[step * N : (step + 1) * N], False)
        scale = s.exp()
        if w is None:
            Js = scale[:, None] * J.double()
            from lightning_mtl.functional import imtl_g_weights

            w = imtl_g_weights(Js @ Js.T, eps=torch.finfo(torch.float32).eps).float() * scale
        grad = (scale[:, None] * full).sum(0)
        grad[:n_shared] = w @ full[:, :n_shared]
        with torch.no_grad():
            for p, g in zip(expected.parameters(), _split(grad, expected)):
                p -= LR * g
        s = s - LR * (scale * losses - 1)
    strategy = IMTL(update_every=2)
    trainer(max_steps=2, callbacks=[strategy]).fit(model, loader(data, batch_size=N))
    torch.testing.assert_close(strategy.weights_tensor(), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(strategy.log_scales, s, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(flat_params(model), flat_params(expected), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ mixed precision
def _fp16(init_scale: float = 2.0**10) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def _fit_amp(cls, **kwargs):
    model, strategy = ConflictNet(), cls()
    trainer(max_epochs=2, callbacks=[strategy], **kwargs).fit(model, loader(make_data(n=64), batch_size=16))
    return flat_params(model), strategy.log_scales, strategy.weights_tensor()


@pytest.mark.parametrize("cls", [IMTLL, IMTL])
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_matches_fp32(cls, precision):
    """s's gradient comes from the rank-averaged (unscaled) losses: the GradScaler's scale never reaches it."""
    reference = _fit_amp(cls)
    kwargs = {"plugins": [_fp16()]} if precision == "16-mixed" else {"precision": "bf16-mixed"}
    result = _fit_amp(cls, **kwargs)
    tol = 2e-3 if precision == "16-mixed" else 3e-2
    for got, expected in zip(result, reference):
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert reference[1].abs().min() > 1e-2


@pytest.mark.parametrize("cls", [IMTLL, IMTL])
def test_fp16_overflow_skips_the_step_and_leaves_s_unchanged(cls):
    plugin = _fp16(init_scale=2.0**30)  # the fp16 gradients overflow: the scaler skips the step
    model, strategy = ConflictNet(), cls()
    before = flat_params(model)
    trainer(max_steps=1, plugins=[plugin], callbacks=[strategy]).fit(
        model, loader(make_data(n=16), batch_size=16)
    )
    assert plugin.scaler.get_scale() < 2.0**30
    assert torch.equal(flat_params(model), before)
    assert torch.equal(strategy.log_scales, torch.zeros(3))


# ------------------------------------------------------------------------------------------ state
RESUMABLE = {
    "imtll": lambda: IMTLL(optimizer="adam", lr=0.05),
    "imtl": lambda: IMTL(),
    "imtl-rep-every2": lambda: IMTL(optimizer="adam", lr=0.05, mode="representation", update_every=2),
}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_resume_matches_uninterrupted(tmp_path, name):
    data = loader(make_data(n=40), batch_size=8)
    straight, s_straight = ConflictNet(optimizer="adam", lr=0.01), RESUMABLE[name]()
    trainer(max_epochs=2, callbacks=[s_straight]).fit(straight, data)
    first = ConflictNet(optimizer="adam", lr=0.01)
    t1 = trainer(max_epochs=1, callbacks=[RESUMABLE[name]()])
    t1.fit(first, data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = ConflictNet(optimizer="adam", lr=0.01), RESUMABLE[name]()
    trainer(max_epochs=2, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.log_scales, s_straight.log_scales, atol=1e-6, rtol=0)
    torch.testing.assert_close(s_resumed.weights_tensor(), s_straight.weights_tensor(), atol=1e-6, rtol=0)
    callbacks = torch.load(tmp_path / "half.ckpt", weights_only=True)["callbacks"]  # tensors and primitives
    (state,) = [v for k, v in callbacks.items() if "IMTL" in k]
    assert state["tasks"] == ["a", "b", "c"]
    assert state["state"]["learnable"]["values"].abs().min() > 0, "s never moved"
    assert "optimizer" in state["state"]["learnable"]


@pytest.mark.parametrize("cls", [IMTLL, IMTL])
def test_state_is_restored_by_task_name(cls):
    a = cls(optimizer="adam", lr=0.05)
    trainer(max_epochs=1, callbacks=[a]).fit(ConflictNet(), loader(make_data(n=32), batch_size=8))
    b = cls(optimizer="adam", lr=0.05)
    b.bind(ConflictNet(tasks=("c", "a", "b")).tasks)  # Lightning restores callback state after setup
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.log_scales, a.log_scales[[2, 0, 1]])
    assert b._scales.learnable._pending_optimizer_state is not None
    moments = b._scales.learnable._pending_optimizer_state["state"][0]["exp_avg"]
    torch.testing.assert_close(
        moments, a._scales.learnable.optimizer.state_dict()["state"][0]["exp_avg"][[2, 0, 1]]
    )
    if cls is IMTL:
        torch.testing.assert_close(b.alpha, a.alpha[[2, 0, 1]])


def test_a_new_fit_starts_from_init():
    strategy = IMTL(init=0.5)
    t = trainer(max_steps=2, callbacks=[strategy])
    t.fit(ConflictNet(), loader(make_data(n=32), batch_size=8))
    assert not torch.allclose(strategy.log_scales, torch.full((3,), 0.5))
    trainer(max_steps=0, callbacks=[strategy]).fit(ConflictNet(), loader(make_data(n=32), batch_size=8))
    torch.testing.assert_close(strategy.log_scales, torch.full((3,), 0.5))


def test_bounds_clamp_the_log_scales():
    strategy = IMTLL(bounds=(-0.1, 0.1), optimizer="sgd", lr=1.0)
    trainer(max_steps=3, callbacks=[strategy]).fit(TinyNet(), loader(make_data(n=48), batch_size=16))
    assert strategy.log_scales.min() >= -0.1 - 1e-7 and strategy.log_scales.max() <= 0.1 + 1e-7
    assert torch.isclose(strategy.log_scales.abs(), torch.tensor(0.1)).any()


# ------------------------------------------------------------------------------------------ bad input, registry
@pytest.mark.parametrize("cls", [IMTLL, IMTL])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init": float("nan")}, "init .* must be a finite number"),
        ({"init": True}, "init .* must be a finite number"),
        ({"bounds": (1.0, -1.0)}, r"bounds must be \(low, high\)"),
        ({"bounds": (0.0,)}, r"bounds must be \(low, high\)"),
        ({"optimizer": "rmsprop"}, "optimizer must be 'match', 'adam' or 'sgd'"),
        ({"lr": 0.0}, "lr must be > 0"),
    ],
)
def test_invalid_hyper_parameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_invalid_gradient_arguments():
    with pytest.raises(ValueError, match="IMTL update_every must be an int >= 1"):
        IMTL(update_every=0)
    with pytest.raises(ValueError, match="IMTL mode must be 'parameters' or 'representation'"):
        IMTL(mode="heads")


def test_compare_registry_names():
    assert type(make_strategy("imtl")) is IMTL
    assert type(make_strategy("imtll")) is IMTLL
    assert type(make_strategy("imtl-g")) is IMTLG


def test_imtl_l_pure_functions_by_hand():
    from lightning_mtl.functional import imtl_l_grad, imtl_l_objective

    losses, s = torch.tensor([2.0, 0.5]), torch.tensor([0.0, math.log(2.0)])
    # e^0·2 − 0 + e^{log 2}·0.5 − log 2 = 3 − log 2; gradient e^{s}L − 1 = (1, 0): task 2 is at its optimum
    assert imtl_l_objective(losses, s).item() == pytest.approx(3.0 - math.log(2.0))
    assert imtl_l_grad(losses, s).tolist() == pytest.approx([1.0, 0.0])
