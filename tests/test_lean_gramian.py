"""The lean Gramian engine (jacobian="lean", issue 11 §3): G = Σ_b J_b J_bᵀ without ever holding J [T, P].

Checked: both routes (hooks: one vmap-ed backward whose parameter hooks fold each parameter's per-task gradients
into G; blocks: one batched backward per parameter block) against gramian(J) and against TorchJD's autogram
engine; a whole fit with jacobian="lean" against the full engine (weighted heads, plain heads, IMTL's head
weights, accumulation windows, update_every, 16-bit AMP); DDP parity (2 ranks x B == 1 process x 2B); the
"auto" rule; the errors for methods that need J itself.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TinyNet, ddp_parity_records, flat_params, loader, make_data, trainer
from torch import nn

from lightning_mtl.functional import gramian
from lightning_mtl.gradients import TaskGradients, jacobian
from lightning_mtl.gradients import lean as lean_module
from lightning_mtl.gradients.jacobian import JacobianEngine
from lightning_mtl.gradients.lean import (
    LeanGramian,
    combination_grads,
    gramian_by_blocks,
    gramian_by_hooks,
    parameter_blocks,
    prefers_lean,
)
from lightning_mtl.strategies.cagrad import CAGrad
from lightning_mtl.strategies.excess_mtl import ExcessMTL
from lightning_mtl.strategies.gradnorm import GradNorm
from lightning_mtl.strategies.imtl import IMTL
from lightning_mtl.strategies.mgda import MGDA
from lightning_mtl.strategies.pcgrad import PCGrad
from lightning_mtl.strategies.upgrad import UPGrad


# ------------------------------------------------------------------------------------------ the pure routes
class _Graph(nn.Module):
    """Linear, conv, layer norm, a weight used twice (tied) and a parameter no loss reaches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.lin = nn.Linear(12, 12)
        self.norm = nn.LayerNorm(12)
        self.unused = nn.Parameter(torch.randn(4))
        self.heads = nn.Linear(12, 4)

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)  # [B, 12]
        h = self.lin(torch.relu(self.lin(h)))  # tied: lin used twice
        out = self.heads(self.norm(h))  # [B, 4]
        return (out - torch.arange(4.0)).pow(2).mean(0)

    def shared(self) -> list[nn.Parameter]:
        return [*self.conv.parameters(), *self.lin.parameters(), *self.norm.parameters(), self.unused]


def _reference(losses: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    return gramian(jacobian(losses, params))


def test_hooks_route_equals_the_gramian_of_the_full_jacobian():
    net = _Graph()
    losses = net.losses(torch.randn(5, 2, 4))
    G = gramian_by_hooks(losses, net.shared())
    assert G.dtype == torch.float64 and G.shape == (4, 4)
    torch.testing.assert_close(G, _reference(losses, net.shared()), atol=1e-10, rtol=1e-6)
    # the graph is retained and the hooks are gone: a plain backward afterwards accumulates normal gradients
    losses.sum().backward()
    assert all(p.grad is not None for p in net.lin.parameters()) and net.unused.grad is None


def test_hooks_route_divides_by_the_amp_scale_squared():
    net = _Graph()
    losses = net.losses(torch.randn(5, 2, 4))
    # seed scaled by 2^10, result divided by 2^20: equal up to float32 rounding of the scaled products
    G = gramian_by_hooks(losses, net.shared(), scale=1024.0)
    torch.testing.assert_close(G, _reference(losses, net.shared()), atol=1e-10, rtol=1e-6)


@pytest.mark.parametrize("max_elements", [None, 1, 50])
def test_blocks_route_equals_the_gramian_of_the_full_jacobian(max_elements):
    net = _Graph()
    losses = net.losses(torch.randn(5, 2, 4))
    halves = []
    G = gramian_by_blocks(
        losses,
        net.shared(),
        JacobianEngine("auto"),
        max_elements=max_elements,
        reduce=lambda J: halves.append(J.shape) or J,  # called once per block, before the product
    )
    torch.testing.assert_close(G, _reference(losses, net.shared()), atol=1e-10, rtol=1e-6)
    assert len(halves) == len(parameter_blocks(net.shared(), max_elements))


def test_parameter_blocks_are_consecutive_and_bounded():
    params = [torch.zeros(n) for n in (3, 4, 10, 1, 1, 2)]
    sizes = [[p.numel() for p in b] for b in parameter_blocks(params, 5)]
    # 3 (+4 > 5) | 4 | 10 alone (larger than the bound) | 1 + 1 + 2
    assert sizes == [[3], [4], [10], [1, 1, 2]]
    # default: an eighth of the 21 elements (3) or the largest parameter (10), whichever is larger
    assert [[p.numel() for p in b] for b in parameter_blocks(params)] == [[3, 4], [10], [1, 1, 2]]


def test_torchjd_autogram_gives_the_same_gramian():
    """Differential test against TorchJD's autogram engine (module hooks, batch_dim=None)."""
    autogram = pytest.importorskip("torchjd.autogram")
    torch.manual_seed(1)
    encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    heads = nn.Linear(8, 5)
    engine = autogram.Engine(encoder, batch_dim=None)
    x = torch.randn(7, 6)
    losses = (heads(encoder(x)) - 1.0).pow(2).mean(0)  # T = 5
    expected = engine.compute_gramian(losses).double()
    torch.testing.assert_close(
        gramian_by_hooks(losses, list(encoder.parameters())), expected, atol=1e-8, rtol=1e-5
    )


def test_fallback_to_blocks_when_vmap_fails(monkeypatch):
    net = _Graph()
    losses = net.losses(torch.randn(5, 2, 4))

    def broken(*args, **kwargs):
        raise RuntimeError("no batching rule for this op")

    monkeypatch.setattr(lean_module, "gramian_by_hooks", broken)
    engine = LeanGramian(JacobianEngine("auto"), owner="Test")
    with pytest.warns(UserWarning, match="Test: the lean engine's batched"):
        G = engine(losses, net.shared())
    assert not engine.hooks
    torch.testing.assert_close(G, _reference(losses, net.shared()), atol=1e-10, rtol=1e-6)


def test_combination_grads_is_the_jacobian_transpose_times_c():
    net = _Graph()
    losses = net.losses(torch.randn(5, 2, 4))
    c = torch.tensor([0.5, -1.0, 2.0, 0.0])
    grads = combination_grads(losses, c, net.shared(), scale=8.0)
    flat = torch.cat([g.flatten() for g in grads])
    torch.testing.assert_close(flat, jacobian(losses, net.shared()).T @ c, atol=1e-6, rtol=1e-5)
    assert torch.equal(grads[-1], torch.zeros(4))  # the unused parameter: zeros, not None


# ------------------------------------------------------------------------------------------ the rule
def test_auto_rule(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(lean_module, "free_memory", lambda device: 8 * 2**30)
    assert not prefers_lean(40, 1_000_000, cpu)  # 160 MB < 256 MiB: today's engine, whatever the memory
    assert not prefers_lean(40, 5_000_000, cpu)  # 800 MB: below 1 GiB and below a quarter of 8 GiB
    assert prefers_lean(40, 10_000_000, cpu)  # 1.6 GB > 1 GiB
    monkeypatch.setattr(lean_module, "free_memory", lambda device: 2 * 2**30)
    assert prefers_lean(40, 5_000_000, cpu)  # 800 MB > a quarter of 2 GiB
    assert not prefers_lean(40, 1_000_000, cpu)
    monkeypatch.setattr(lean_module, "free_memory", lambda device: None)
    assert not prefers_lean(40, 5_000_000, cpu)  # unknown free memory: only the 1 GiB bound


def test_auto_keeps_the_full_engine_for_small_models():
    strategy = UPGrad()
    trainer(max_steps=2, callbacks=[strategy]).fit(_Conflict(), loader(make_data(n=32), batch_size=8))
    assert strategy._gradients._lean_choice == {(3, 48): False}


def test_auto_chooses_lean_above_the_threshold(monkeypatch):
    monkeypatch.setattr(lean_module, "LEAN_ALWAYS_BYTES", 100)
    monkeypatch.setattr(lean_module, "LEAN_MIN_BYTES", 100)
    auto, full = UPGrad(), UPGrad(jacobian="batched")
    for s in (auto, full):
        trainer(max_epochs=1, callbacks=[s]).fit(_Conflict(), loader(make_data(n=32), batch_size=8))
    assert auto._gradients._lean_choice == {(3, 48): True}
    torch.testing.assert_close(auto.weights_tensor(), full.weights_tensor(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "make",
    [lambda: ExcessMTL(jacobian="lean"), lambda: GradNorm(layer="encoder.0", jacobian="lean")],
)
def test_lean_is_refused_where_the_jacobian_itself_is_needed(make):
    with pytest.raises(ValueError, match="jacobian='lean' computes only the Gramian"):
        make()


def test_unknown_engine_names_the_choices():
    with pytest.raises(ValueError, match="'auto', 'batched' or 'loop' \\(or 'lean'"):
        UPGrad(jacobian="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="never forms the Jacobian"):
        JacobianEngine("lean")


def test_asking_a_lean_window_for_the_jacobian_is_a_clear_error():
    class Probe(UPGrad):
        def compute_weights(self, stat, losses):
            with pytest.raises(RuntimeError, match="never forms the\\s+Jacobian"):
                self._gradients.jacobian(self._ctx)
            return super().compute_weights(stat, losses)

        def backward(self, ctx):
            self._ctx = ctx
            super().backward(ctx)

    strategy = Probe(jacobian="lean")
    trainer(max_steps=1, callbacks=[strategy]).fit(_Conflict(), loader(make_data(n=8), batch_size=8))
    assert isinstance(strategy._gradients, TaskGradients)


# ------------------------------------------------------------------------------------------ whole fits
class _Conflict(TinyNet):
    """TinyNet with two shared layers and a conflicting third task."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in self.task_names})

    def task_losses(self, batch, batch_idx):
        x, y = batch
        return super().task_losses((x, torch.stack([y[:, 0], y[:, 1], -2 * y[:, 0]], 1)), batch_idx)


STRATEGIES = {
    "upgrad": lambda jacobian, **kw: UPGrad(jacobian=jacobian, **kw),  # weighted heads
    "pcgrad": lambda jacobian, **kw: PCGrad(seed=3, jacobian=jacobian, **kw),  # plain heads, random
    "cagrad": lambda jacobian, **kw: CAGrad(jacobian=jacobian, **kw),  # plain heads
    "imtl": lambda jacobian, **kw: IMTL(jacobian=jacobian, **kw),  # explicit head weights
    "mgda": lambda jacobian, **kw: MGDA(jacobian=jacobian, **kw),
}


def _fit(make, *, batch_size=8, epochs=2, n=48, **module_kwargs):
    model = _Conflict(**module_kwargs)
    strategy = make()
    trainer(max_epochs=epochs, callbacks=[strategy]).fit(model, loader(make_data(n=n), batch_size=batch_size))
    return model, strategy


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_lean_fit_equals_the_full_engine(name):
    make = STRATEGIES[name]
    full, s_full = _fit(lambda: make("batched"))
    lean, s_lean = _fit(lambda: make("lean"))
    assert s_lean._gradients._lean_choice == {} and s_lean._gradients.jacobian_method == "lean"
    torch.testing.assert_close(s_lean.weights_tensor(), s_full.weights_tensor(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_params(lean), flat_params(full), atol=1e-6, rtol=1e-5)
    assert not torch.equal(flat_params(lean), flat_params(_Conflict()))  # it trained


@pytest.mark.parametrize("name", ["upgrad", "pcgrad", "imtl"])
def test_lean_accumulation_window_equals_the_large_batch(name):
    """G of the window's summed Jacobian, not the sum of the micro-batches' Gramians: 4 x 8 == 1 x 32."""
    make = STRATEGIES[name]
    big, s_big = _fit(lambda: make("batched"), batch_size=32, n=64)
    small, s_small = _fit(lambda: make("lean"), n=64, accumulate_grad_batches=4)
    torch.testing.assert_close(s_small.weights_tensor(), s_big.weights_tensor(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_params(small), flat_params(big), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["upgrad", "cagrad"])
def test_lean_update_every_equals_the_full_engine(name):
    make = STRATEGIES[name]
    full, _ = _fit(lambda: make("batched", update_every=3))
    lean, _ = _fit(lambda: make("lean", update_every=3))
    torch.testing.assert_close(flat_params(lean), flat_params(full), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lean_trains_under_mixed_precision(precision):
    if precision == "16-mixed" and not torch.cuda.is_available():
        pytest.skip("16-mixed needs CUDA")
    model = _Conflict()
    strategy = CAGrad(jacobian="lean")
    before = flat_params(model).clone()
    trainer(max_epochs=2, precision=precision, callbacks=[strategy]).fit(
        model, loader(make_data(n=48), batch_size=8)
    )
    after = flat_params(model)
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    assert torch.isfinite(strategy.weights_tensor()).all()


def test_representation_mode_ignores_lean():
    """The representation's gradients are small: jacobian='lean' leaves representation mode as it is."""
    from helpers import RepTinyNet

    strategy = UPGrad(mode="representation", jacobian="lean")
    trainer(max_steps=2, callbacks=[strategy]).fit(RepTinyNet(), loader(make_data(n=16), batch_size=8))
    assert strategy._gradients._lean is False and strategy.weights_tensor() is not None


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["upgrad", pytest.param("pcgrad", marks=pytest.mark.ddp_extra)])
def test_lean_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, name):
    """Each parameter block's J_b is all-reduced before J_b J_bᵀ: the global batch's Gramian, exactly."""
    make = STRATEGIES[name]
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, lambda: make("lean"), epochs=3, model=_Conflict, tag=name
    )
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, abs=1e-5), task


# ------------------------------------------------------------------------------------------ memory
def _peak_bytes(fn) -> float:
    """Peak of the running sum of tensor allocations minus frees recorded by torch.profiler (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    total = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        total += event.self_cpu_memory_usage
        peak = max(peak, total)
    return float(peak)


def test_the_hooks_route_never_holds_the_jacobian():
    """8 layers of 128² (132 k shared parameters), T = 16: J is 8.4 MB; the hooks route holds about one
    layer's J_p (1/8 of it) at a time, today's engine J itself (and its per-parameter pieces while concatenating)."""
    torch.manual_seed(0)
    encoder = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(128, 128), nn.ReLU())])
    heads = nn.Linear(128, 16)
    params = list(encoder.parameters())
    losses = (heads(encoder(torch.randn(4, 128))) - 1).pow(2).mean(0)
    jac_bytes = 16 * sum(p.numel() for p in params) * 4
    lean = _peak_bytes(lambda: gramian_by_hooks(losses, params))
    full = _peak_bytes(lambda: gramian(jacobian(losses, params)))
    assert full >= jac_bytes
    assert lean <= 0.25 * jac_bytes, (lean, jac_bytes)
    blocks = _peak_bytes(lambda: gramian_by_blocks(losses, params, JacobianEngine("auto")))
    assert blocks <= 0.5 * jac_bytes, (blocks, jac_bytes)


def test_auto_takes_one_route_on_every_rank(monkeypatch):
    """Free memory differs between ranks: the choice is all-reduced once (any rank choosing lean wins), so that
    every rank runs the same collectives."""
    from types import SimpleNamespace

    reduced = []

    class Strategy:
        def reduce(self, tensor, reduce_op):
            reduced.append(float(tensor))
            return (tensor + 0.0) / 2  # this rank says 1 or 0, the other rank 0: mean 0.5 or 0

    net = _Conflict()
    fake_trainer = SimpleNamespace(world_size=2, strategy=Strategy())
    ctx = SimpleNamespace(losses=torch.zeros(3), module=net, world_size=2, trainer=fake_trainer)
    monkeypatch.setattr(lean_module, "LEAN_MIN_BYTES", 0)
    monkeypatch.setattr(lean_module, "LEAN_ALWAYS_BYTES", 10**12)
    monkeypatch.setattr(
        lean_module, "free_memory", lambda device: 100
    )  # this rank: 3·48·4 bytes > 25 % of 100
    gradients = TaskGradients("Test", jacobian="auto", gramian_only=True)
    assert gradients.uses_lean(ctx) and reduced == [1.0]
    assert gradients.uses_lean(ctx) and reduced == [1.0]  # decided once per (T, P)
    monkeypatch.setattr(lean_module, "free_memory", lambda device: 10**9)  # plenty of memory: full engine
    gradients = TaskGradients("Test", jacobian="auto", gramian_only=True)
    assert not gradients.uses_lean(ctx) and reduced == [1.0, 0.0]
    # sync="local" needs no agreement; owners that need J never go lean
    assert not TaskGradients("Test", jacobian="auto").uses_lean(ctx)
