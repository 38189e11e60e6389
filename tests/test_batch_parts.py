"""Independent gradient samples (strategies with ``batch_parts > 1``) and shared-direction updates
(:class:`GradientDirection`): the batch splitter, the module's per-part losses, the engine's part Jacobians
and ``backward_direction``, DDP exactness of the parts."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from helpers import TinyNet, ddp_parity_records, flat_params, loader, make_data, trainer
from lightning.pytorch.plugins import MixedPrecision

from lightning_mtl import masked_mean
from lightning_mtl.batch_parts import batch_length, part_sizes, split_batch
from lightning_mtl.strategies import EqualWeighting
from lightning_mtl.strategies._gradient_direction import Direction, GradientDirection


# ------------------------------------------------------------------------------------------ split_batch
def test_split_tensors_dicts_namedtuples_and_string_columns():
    Pair = namedtuple("Pair", ["x", "y"])
    batch = {
        "input": Pair(torch.arange(7).view(7, 1), torch.arange(7) * 10),
        "names": [f"s{i}" for i in range(7)],
        "meta": {"source": "train", "k": 3, "none": None},
    }
    parts = split_batch(batch, 3)
    assert part_sizes(batch, 3) == [3, 2, 2]
    assert [p["input"].x.flatten().tolist() for p in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [p["input"].y.tolist() for p in parts] == [[0, 10, 20], [30, 40], [50, 60]]
    assert all(isinstance(p["input"], Pair) for p in parts)
    assert [p["names"] for p in parts] == [["s0", "s1", "s2"], ["s3", "s4"], ["s5", "s6"]]
    assert all(p["meta"] == {"source": "train", "k": 3, "none": None} for p in parts)
    # the parts are disjoint and their union is the batch, in order
    assert torch.cat([p["input"].x for p in parts]).flatten().tolist() == list(range(7))


def test_split_list_and_tuple_batches_keep_their_type():
    x, y = torch.randn(6, 2), torch.randn(6)
    for batch in ([x, y], (x, y)):
        parts = split_batch(batch, 2)
        assert all(type(p) is type(batch) for p in parts)
        torch.testing.assert_close(parts[1][0], x[3:])


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (
            {"x": torch.zeros(4, 2), "y": torch.zeros(5)},
            r"different sizes along dim 0.*\['x'\]: 4.*\['y'\]: 5",
        ),
        ((torch.zeros(4), torch.tensor(2.0)), r"batch\[1\] is a 0-d tensor"),
        ({"a": 1, "b": "s"}, "holds no tensor"),
        (torch.zeros(2, 3), "batch of 2 sample.*into 3 disjoint parts.*batch size of at least 3"),
    ],
)
def test_unsplittable_batches_are_clear_errors(batch, message):
    with pytest.raises(ValueError, match=message):
        split_batch(batch, 3)


def test_batch_length_and_bad_part_count():
    assert batch_length([torch.zeros(5, 1), [torch.zeros(5)]]) == 5
    with pytest.raises(ValueError, match="parts must be an int >= 1"):
        split_batch(torch.zeros(4), 0)


# ------------------------------------------------------------------------------------------ engine & module
class PlainDirection(GradientDirection):
    """d = Σᵢ gᵢ of the whole batch (or of the mean over the parts): equal weighting written as a direction."""

    def __init__(self, parts: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.batch_parts = parts
        self.seen: list[tuple[int, ...]] = []

    def compute_direction(self, jacobian, losses):
        self.seen.append(tuple(jacobian.shape))
        J = jacobian if jacobian.dim() == 2 else jacobian.mean(0)
        T = J.shape[0]
        ones = torch.ones(T, device=J.device)
        return Direction(J.sum(0), ones, ones)


def _fit(strategy, epochs=2, batch_size=12, accumulate=1, **kwargs):
    net = TinyNet(accumulate_grad_batches=accumulate, **kwargs)
    trainer(max_epochs=epochs, callbacks=[strategy]).fit(net, loader(make_data(n=48), batch_size))
    return flat_params(net)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_direction_equal_to_sum_of_gradients_matches_equal_weighting(accumulate):
    reference = _fit(EqualWeighting(), accumulate=accumulate)
    torch.testing.assert_close(_fit(PlainDirection(), accumulate=accumulate), reference, atol=1e-6, rtol=0)


def test_parts_mean_equals_the_whole_batch_and_parts_reach_the_strategy():
    strategy = PlainDirection(parts=3)
    # equal parts (12 = 3 × 4): the mean of the parts' Jacobians is the whole batch's
    torch.testing.assert_close(_fit(strategy), _fit(EqualWeighting()), atol=1e-6, rtol=0)
    assert strategy.seen and all(shape[:2] == (3, 3) for shape in strategy.seen)


def test_task_losses_is_called_once_per_part_on_disjoint_samples():
    calls: list[int] = []

    class Counting(TinyNet):
        def task_losses(self, batch, batch_idx):
            calls.append(batch[0].shape[0])
            return super().task_losses(batch, batch_idx)

    trainer(max_steps=1, callbacks=[PlainDirection(parts=3)]).fit(Counting(), loader(make_data(n=48), 10))
    assert calls == [4, 3, 3]


def test_a_batch_that_cannot_be_split_names_the_strategy_and_the_fix():
    with pytest.raises(
        ValueError, match=r"PlainDirection takes 3 independent gradient samples.*batch size of at least 3"
    ):
        _fit(PlainDirection(parts=3), batch_size=2)


class FirstPart(PlainDirection):
    """Only part 0 moves the shared parameters (top-level: ddp_spawn pickles it)."""

    def compute_direction(self, jacobian, losses):
        ones = torch.ones(jacobian.shape[1], device=jacobian.device)
        return Direction(jacobian[0].sum(0), ones, ones)


@pytest.mark.ddp_extra  # the same mechanism as MoCo's local-sync / MoDo's and SDMGrad's DDP test
@pytest.mark.timeout(240)
def test_parts_are_exact_under_ddp(tmp_path):
    # 2 ranks × 6 ≡ 1 process × 12: the union of the ranks' part j is the single process's part j
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, lambda: FirstPart(parts=3), epochs=3, batch_size=6, n=48, tag="parts"
    )
    torch.testing.assert_close(rank0["params"], rank1["params"], atol=0, rtol=0)
    torch.testing.assert_close(single["params"], rank0["params"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ the held-out last part
class HeldOut(PlainDirection):
    """``d = ½J₀ᵀ1 + J₂ᵀc`` with fixed ``c`` and head weights ``h``: with the last part held out (the window's one
    vector-Jacobian product) or formed (``hold=False``: ``J₂ᵀc`` from the Jacobian), which must agree."""

    C = (0.7, -0.4, 1.3)
    H = (1.0, 2.0, 0.5)

    def __init__(self, hold: bool = True, shared: bool = True, always_held: bool = False, **kwargs):
        super().__init__(parts=3, **kwargs)
        self.holds_out_last_part = hold
        self.shared = shared
        self.always_held = always_held  # return `held` with the formed parts too: the window applies it

    def compute_direction(self, jacobian, losses):
        self.seen.append(tuple(jacobian.shape))
        c = torch.tensor(self.C, dtype=jacobian.dtype)
        h = torch.tensor(self.H)
        d = 0.5 * jacobian[0].sum(0) if self.shared else None
        if jacobian.shape[0] < self.batch_parts or self.always_held:
            return Direction(d, torch.ones(3), h, held=c)
        full = c @ jacobian[2] if d is None else d + c @ jacobian[2]
        return Direction(full, torch.ones(3), h)


@pytest.mark.parametrize(
    ("batch_size", "accumulate", "shared"), [(12, 1, True), (10, 1, True), (12, 2, True), (12, 2, False)]
)
def test_a_held_out_last_part_gives_the_update_of_its_formed_jacobian(batch_size, accumulate, shared):
    # unequal parts (10 = 4 + 3 + 3), accumulation, and a direction that is the held-out part's alone; the heads
    # get Σ hᵢ∇Lᵢ (h ≠ 1) in both; `held` returned with formed parts is applied from the formed Jacobian
    held, formed = HeldOut(shared=shared), HeldOut(hold=False, shared=shared)
    got = _fit(held, batch_size=batch_size, accumulate=accumulate)
    torch.testing.assert_close(
        got, _fit(formed, batch_size=batch_size, accumulate=accumulate), atol=1e-6, rtol=0
    )
    applied = HeldOut(hold=False, shared=shared, always_held=True)
    torch.testing.assert_close(
        _fit(applied, batch_size=batch_size, accumulate=accumulate), got, atol=1e-6, rtol=0
    )
    assert held.seen and all(shape[:2] == (2, 3) for shape in held.seen)
    assert formed.seen and all(shape[:2] == (3, 3) for shape in formed.seen)


class PartialEvery(TinyNet):
    """Task b's loss is a masked mean (partial labels, every sample labelled) on the batches ``partial(batch_idx)``
    selects and a plain mean on the others: the same values, with and without part counts."""

    def __init__(self, partial, **kwargs):
        super().__init__(**kwargs)
        self.partial = partial

    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        if self.partial(batch_idx):
            x, y = batch
            b = self.heads["b"](self.encoder(x)).squeeze(1)
            losses["b"] = masked_mean((b - y[:, 1]) ** 2, torch.ones_like(b, dtype=torch.bool))
        return losses


@pytest.mark.parametrize("partial", ["odd", "all"])
def test_partial_labels_form_the_held_out_part_and_give_the_same_update(partial):
    # a window whose second micro-batch brings part counts forms the first's held-out Jacobian; a window of
    # partial losses throughout never holds it out; both equal the update without partial labels
    def fit(strategy, which):
        net = PartialEvery(which, accumulate_grad_batches=2)
        trainer(max_epochs=2, callbacks=[strategy]).fit(net, loader(make_data(n=48), 12))
        return flat_params(net)

    which = (lambda i: i % 2 == 1) if partial == "odd" else (lambda i: True)
    strategy = HeldOut()
    got = fit(strategy, which)
    torch.testing.assert_close(got, fit(HeldOut(), lambda i: False), atol=1e-6, rtol=0)
    assert strategy.seen and all(shape[:2] == (3, 3) for shape in strategy.seen)


def test_a_held_out_last_part_is_unscaled_under_fp16_loss_scaling():
    # the product is taken of the scaled losses and unscaled like the parts' Jacobians: one step's update under a
    # GradScaler of 2¹⁰ is the fp32 update up to fp16 rounding (a scale left in would be off by a factor 1024)
    def update(strategy, fp16):
        net = TinyNet()
        before = flat_params(net)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)] if fp16 else []
        trainer(max_steps=1, plugins=plugins, callbacks=[strategy]).fit(net, loader(make_data(n=48), 12))
        return flat_params(net) - before

    reference = update(HeldOut(hold=False), fp16=False)
    assert float(reference.abs().max()) > 0.1
    torch.testing.assert_close(update(HeldOut(), fp16=True), reference, atol=1e-3, rtol=0)
    torch.testing.assert_close(update(HeldOut(), fp16=False), reference, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ the heads' correction
class StillShared(PlainDirection):
    """A zero shared direction (with ``hold``, ``held=None``: the held-out part's coefficients, zero too): the heads'
    term must be cancelled exactly on the shared parameters, whatever each micro-batch's part fractions."""

    def __init__(self, hold: bool = False, **kwargs):
        super().__init__(parts=3, **kwargs)
        self.holds_out_last_part = hold

    def compute_direction(self, jacobian, losses):
        T = jacobian.shape[1]
        h = torch.tensor([1.0, 2.0, 0.5][:T])
        if jacobian.shape[0] < self.batch_parts:  # held=None counts as zero coefficients
            return Direction(None, torch.ones(T), h, held=None)
        return Direction(torch.zeros(jacobian.shape[-1]), torch.ones(T), h)


class VaryingLabels(TinyNet):
    """Task b labelled on a different share of each part in each batch (partial labels; batches of 12)."""

    calls = 0

    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        x, y = batch
        b = self.heads["b"](self.encoder(x)).squeeze(1)
        part = self.calls % 3  # task_losses runs once per part, in order
        self.calls += 1
        keep = torch.arange(x.shape[0]) < 1 + (part + batch_idx) % 3  # 1 + (p + batch_idx) mod 3 samples
        losses["b"] = masked_mean((b - y[:, 1]) ** 2, keep)
        return losses


@pytest.mark.parametrize(
    ("net", "hold", "n", "batch_size"),
    [(TinyNet, False, 46, 10), (TinyNet, True, 46, 10), (VaryingLabels, False, 48, 12)],
)
def test_a_zero_direction_leaves_the_shared_parameters_when_part_fractions_change_within_a_window(
    net, hold, n, batch_size
):
    # accumulation over 3 micro-batches: with batches of 10, 10, 10 | 10, 6 the last window's parts are 4/3/3 and
    # 2/2/2; with varying labels each micro-batch's parts hold different shares of task b's labelled samples
    model = net(accumulate_grad_batches=3)
    shared = [p.detach().clone() for p in model.encoder.parameters()]
    heads = [p.detach().clone() for p in model.heads.parameters()]
    trainer(max_epochs=2, callbacks=[StillShared(hold=hold)]).fit(model, loader(make_data(n=n), batch_size))
    for before, after in zip(shared, model.encoder.parameters(), strict=True):
        torch.testing.assert_close(after.detach(), before, atol=1e-6, rtol=0)
    assert any(
        not torch.allclose(a.detach(), b) for a, b in zip(model.heads.parameters(), heads, strict=True)
    )
