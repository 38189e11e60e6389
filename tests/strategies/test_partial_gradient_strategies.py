"""Partial labels (issue 9, section 1) for the gradient strategies with per-task state or their own step:
GradNorm, GradVac, ExcessMTL, IMTL, GradDrop, MoCo, DBMTL, MoDo and SDMGrad (batch parts:
``test_partial_batch_parts.py``).

For each: an absent task's weight is 0 and its state (and its entries of a private optimizer's state) is
bit-for-bit untouched across a step where it is absent; a task absent from every step leaves the present
tasks trained exactly as the paper's rule on the two-task problem; GradNorm's DDP update with uneven label
counts per rank equals the single-process one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    TinyNet,
    ddp_parity_records,
    flat_params,
    loader,
    make_data,
    single_process_batches,
    trainer,
)
from torch import Tensor, nn

from lightning_mtl import Task, masked_mean
from lightning_mtl.strategies.dbmtl import DBMTL
from lightning_mtl.strategies.excess_mtl import ExcessMTL
from lightning_mtl.strategies.graddrop import GradDrop
from lightning_mtl.strategies.gradnorm import GradNorm
from lightning_mtl.strategies.gradvac import GradVac
from lightning_mtl.strategies.imtl import IMTL
from lightning_mtl.strategies.moco import MoCo
from lightning_mtl.strategies.modo import MoDo
from lightning_mtl.strategies.sdmgrad import SDMGrad

C = 2  # the index of the partial task "c"


class AbsentNet(TinyNet):
    """TinyNet whose task ``c`` is partial and absent on the batches ``absent`` (``"all"``: every batch);
    ``rep`` marks the encoder output as the shared representation (GradDrop)."""

    def __init__(self, absent: Any = (), rep: bool = False, tasks: Any = None, **kwargs: Any) -> None:
        super().__init__(tasks=tasks or ("a", "b", Task("c", partial=True)), **kwargs)
        self.absent, self.rep = absent, rep

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        if self.rep:
            z = self.shared_representation(z)
        losses = {
            t: nn.functional.mse_loss(self.heads[t](z).squeeze(1), y[:, i])
            for i, t in enumerate(self.task_names)
        }
        if "c" in losses and (self.absent == "all" or batch_idx in self.absent):
            del losses["c"]
        return losses


def _moments(learnable: Any, i: int) -> list[Tensor]:
    """Entry ``i`` of every per-entry tensor of a private optimizer's state (Adam's moments)."""
    if learnable.optimizer is None:
        return []
    state = learnable.optimizer.state.get(learnable.param, {})
    return [v[i].clone() for v in state.values() if isinstance(v, Tensor) and v.dim() > 0]


def _c_state(strategy: Any) -> list[Tensor]:
    """Every piece of ``strategy``'s state that belongs to task c (copies)."""
    if isinstance(strategy, GradVac):
        t = strategy.targets
        return [] if t is None else [t[C].clone(), t[:, C].clone()]
    if isinstance(strategy, ExcessMTL):
        if strategy.log_weights is None:
            return []
        return [
            strategy.sq_grad_sum[C].clone(),
            strategy.baseline[C].clone(),
            strategy.log_weights[C].clone(),
        ]
    if isinstance(strategy, MoCo):
        return [] if strategy.tracked is None else [strategy.tracked[C].clone(), strategy.lambdas[C].clone()]
    if isinstance(strategy, DBMTL):
        return [] if strategy.ema is None else [strategy.ema[C].clone()]
    if isinstance(strategy, (MoDo, SDMGrad)):
        simplex = strategy.lambdas if isinstance(strategy, MoDo) else strategy.inner_weights
        return [] if simplex is None else [simplex[C].clone()]
    if isinstance(strategy, IMTL):
        alpha = [] if strategy.alpha is None else [strategy.alpha[C].clone()]
        return [strategy.log_scales[C].clone(), *alpha, *_moments(strategy._scales.learnable, C)]
    if isinstance(strategy, GradNorm):
        initial = [] if strategy.initial_losses is None else [strategy.initial_losses[C].clone()]
        return [strategy.params[C].detach().clone(), *initial, *_moments(strategy._learnable, C)]
    if isinstance(strategy, GradDrop):
        return []
    raise AssertionError(type(strategy))


def _present_state(strategy: Any) -> list[Tensor]:
    """Some state of the present tasks a and b (to check that the step moved it); none before the first update."""
    if not _c_state(strategy):
        return []
    if isinstance(strategy, GradVac):
        return [strategy.targets[0, 1].clone()]
    if isinstance(strategy, ExcessMTL):
        return [strategy.sq_grad_sum[:2].clone()]
    if isinstance(strategy, MoCo):
        return [strategy.tracked[:2].clone()]
    if isinstance(strategy, DBMTL):
        return [strategy.ema[:2].clone()]
    if isinstance(strategy, MoDo):
        return [strategy.lambdas[:2].clone()]
    if isinstance(strategy, SDMGrad):
        return [strategy.inner_weights[:2].clone()]
    if isinstance(strategy, IMTL):
        return [strategy.log_scales[:2].clone()]
    if isinstance(strategy, GradNorm):
        return [strategy.params[:2].detach().clone()]
    return []


# name -> (strategy factory, model keyword arguments)
STRATEGIES: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "GradNorm": (lambda: GradNorm(alpha=1.5, lr=0.05), {}),
    "GradVac": (lambda: GradVac(beta=0.5, seed=3), {}),
    "ExcessMTL": (lambda: ExcessMTL(robust_step_size=0.5), {}),
    "IMTL": (lambda: IMTL(optimizer="adam", lr=0.05), {}),
    "GradDrop": (lambda: GradDrop(seed=3), {"rep": True}),
    "MoCo": (lambda: MoCo(), {}),
    "DBMTL": (lambda: DBMTL(), {}),
    "MoDo": (lambda: MoDo(gamma=0.5), {}),
    "SDMGrad": (lambda: SDMGrad(lam=0.3), {}),
}


class Snapshots(pl.Callback):
    """c's state, the present tasks' state and the weights at the start and end of every batch."""

    def __init__(self) -> None:
        self.start: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        self.end: dict[int, tuple[list[Tensor], list[Tensor], dict[str, float] | None]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        s = pl_module.strategy
        self.start[batch_idx] = (_c_state(s), _present_state(s) if batch_idx else [])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = pl_module.strategy
        self.end[batch_idx] = (_c_state(s), _present_state(s), s.weights)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_step_without_the_task_leaves_its_state_untouched_and_its_weight_zero(name):
    make, model_kwargs = STRATEGIES[name]
    strategy, snaps = make(), Snapshots()
    assert type(strategy).supports_absent_tasks
    net = AbsentNet(absent={2}, **model_kwargs)
    trainer(max_steps=4, callbacks=[strategy, snaps]).fit(net, loader(make_data(n=64), 16))
    before, after = snaps.start[2][0], snaps.end[2][0]
    assert len(before) == len(after)
    for old, new in zip(before, after):  # bit-for-bit, private optimizer moments included
        assert torch.equal(old, new), (name, old, new)
    weights = snaps.end[2][2]
    if weights is not None:
        assert weights["c"] == 0.0 and weights["a"] != 0.0
    for old, new in zip(snaps.start[2][1], snaps.end[2][1]):  # the present tasks' state moved
        assert not torch.equal(old, new), name
    at_vertex = isinstance(strategy, SDMGrad) and float(before[0]) in (0.0, 1.0)  # SDMGrad's w may rest at 0
    if before and not at_vertex:  # present again at batch 3: c's state moves again
        assert any(not torch.equal(o, n) for o, n in zip(snaps.start[3][0], snaps.end[3][0])), name
    if isinstance(strategy, GradNorm):  # Σ w = T with the absent weight untouched
        assert float(strategy.params.detach().sum()) == pytest.approx(3.0, abs=1e-5)
    if isinstance(strategy, ExcessMTL):  # Σ w = T over all tasks
        assert float(strategy.log_weights.exp().sum()) == pytest.approx(3.0, abs=1e-9)
    if isinstance(strategy, (MoCo, MoDo)):  # λ stays on the simplex
        assert float(strategy.lambdas.sum()) == pytest.approx(1.0, abs=1e-12)
    if isinstance(strategy, SDMGrad):
        assert float(strategy.inner_weights.sum()) == pytest.approx(1.0, abs=1e-12)


def _two_task_run(name: str, absent_net: bool, steps: int = 4) -> tuple[Tensor, dict[str, float] | None, Any]:
    make, model_kwargs = STRATEGIES[name]
    strategy = make()
    if absent_net:
        net = AbsentNet(absent="all", **model_kwargs)
    else:
        net = AbsentNet(tasks=("a", "b"), **model_kwargs)
    trainer(max_steps=steps, callbacks=[strategy]).fit(net, loader(make_data(n=64), 16))
    shared = [net.encoder, net.heads["a"], net.heads["b"]]
    return torch.cat([flat_params(m) for m in shared]), strategy.weights, strategy


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_task_absent_from_every_step_leaves_the_two_task_problem(name):
    # c never labelled (also at the first update: its state starts at the method's initial value): the
    # shared layers and the heads of a and b train exactly as the method on the tasks a and b alone, and c's
    # weight is 0. Fill values and the present tasks' shares (GradNorm's Σw, ExcessMTL's Σw, MoCo's Σλ) make
    # the narrowed problem the two-task one.
    three, w3, s3 = _two_task_run(name, absent_net=True)
    two, w2, _ = _two_task_run(name, absent_net=False)
    torch.testing.assert_close(three, two, atol=1e-6, rtol=0)
    if w3 is not None:
        assert w3["c"] == 0.0
        assert w3["a"] == pytest.approx(w2["a"], abs=1e-6) and w3["b"] == pytest.approx(w2["b"], abs=1e-6)
    if isinstance(s3, GradNorm):  # c's weight never moved from 1; L_c(0) never recorded
        assert float(s3.params[C]) == 1.0 and math.isnan(float(s3.initial_losses[C]))
    if isinstance(s3, GradVac):  # c's targets stay at the initial 0
        assert not s3.targets[C].any() and not s3.targets[:, C].any()
    if isinstance(s3, MoCo):
        assert float(s3.lambdas[C]) == pytest.approx(1 / 3) and not s3.tracked[C].any()
    if isinstance(s3, MoDo):  # c keeps the initial 1/3 of the simplex; a and b move within the other 2/3
        assert float(s3.lambdas[C]) == pytest.approx(1 / 3, abs=1e-12)
    if isinstance(s3, ExcessMTL):  # S = 0, e⁰ unset, w = 1
        assert not s3.sq_grad_sum[C].any() and float(s3.baseline[C]) == 0.0
        assert float(s3.log_weights[C].exp()) == pytest.approx(1.0, abs=1e-12)


def test_gradnorm_records_the_initial_loss_at_the_first_step_that_labels_the_task():
    # c absent at batches 0 and 1: L_c(0) is c's loss at batch 2 (the loss before that step's update)
    ds = make_data(n=64)
    seen: dict[str, float] = {}

    class LossAtBatch2(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                x, y = batch
                with torch.no_grad():
                    pred = pl_module.heads["c"](pl_module.encoder(x)).squeeze(1)
                seen["c"] = float(nn.functional.mse_loss(pred, y[:, C]))

    strategy = GradNorm()
    trainer(max_steps=3, callbacks=[strategy, LossAtBatch2()]).fit(AbsentNet(absent={0, 1}), loader(ds, 16))
    assert float(strategy.initial_losses[C]) == pytest.approx(seen["c"], rel=1e-6)
    assert strategy._initial_count.tolist() == [1, 1, 1]


def test_gradnorm_loads_a_checkpoint_with_one_count_for_every_task():
    strategy = GradNorm()
    strategy.bind([Task("a"), Task("b")])
    state = {
        "learnable": strategy._learnable.state_dict(),
        "initial_sum": torch.tensor([2.0, 4.0], dtype=torch.float64),
        "initial_count": 2,  # the format before partial labels
    }
    strategy.load_task_state(state, [1, 0])
    assert strategy.initial_losses.tolist() == [2.0, 1.0]
    assert strategy._initial_count.tolist() == [2, 2]


def test_an_absent_micro_batch_in_a_window_that_labels_the_task_counts_it_present():
    # accumulation: c is present in window 0 (labelled by its second micro-batch) and absent in window 1
    # (neither micro-batch labels it): c's tracked gradient moves in the first window only
    snaps = Snapshots()
    strategy = MoCo()
    trainer(max_steps=2, callbacks=[strategy, snaps]).fit(
        AbsentNet(absent={0, 2, 3}, accumulate_grad_batches=2), loader(make_data(n=64), 8)
    )
    assert snaps.end[1][0][0].any()  # after window 0: c tracked
    assert torch.equal(snaps.end[1][0][0], snaps.end[3][0][0])  # window 1: untouched
    assert snaps.end[3][2]["c"] == 0.0 and snaps.end[1][2]["c"] > 0.0


# ------------------------------------------------------------------------------------------ DDP
class SparseLabels(TinyNet):
    """Task b labelled where ``x[:, 0] > 1.2`` (about 1 sample in 9: uneven counts per rank, and some global
    batches with none, where b is absent); task c absent on every third batch."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(tasks=("a", Task("b", partial=True), Task("c", partial=True)), **kwargs)

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        out = {t: self.heads[t](z).squeeze(1) for t in self.task_names}
        # c: an all-false mask (not a missing loss) keeps its head in the graph, as DDP requires
        c_labelled = torch.full_like(x[:, 0], float(batch_idx % 3 != 1), dtype=torch.bool)
        return {
            "a": nn.functional.mse_loss(out["a"], y[:, 0]),
            "b": masked_mean((out["b"] - y[:, 1]) ** 2, x[:, 0] > 1.2),
            "c": masked_mean((out["c"] - y[:, 2]) ** 2, c_labelled),
        }


def _gradnorm() -> GradNorm:
    return GradNorm(alpha=1.5, lr=0.05)


def test_the_sparse_labels_model_has_absent_steps_and_uneven_counts():
    # what the DDP test below relies on: among the single process's batches of 16 (the union of the two
    # ranks' batches of 8, in the order of the sampler Lightning gives them), some have no label of b (b
    # absent) and some have labels on one rank's half only
    ds = make_data(n=64)
    x = ds.tensors[0]
    absent = one_half = 0
    for batch in single_process_batches(ds, batch_size=16, epochs=3):
        labelled = x[batch, 0] > 1.2
        rank0, rank1 = int(labelled[0::2].sum()), int(labelled[1::2].sum())  # ranks take alternate samples
        absent += rank0 + rank1 == 0
        one_half += (rank0 == 0) != (rank1 == 0)
    assert absent > 0 and one_half > 0


@pytest.mark.timeout(300)
def test_gradnorm_uneven_label_counts_are_exact_under_ddp(tmp_path):
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, _gradnorm, epochs=3, batch_size=8, model=SparseLabels, tag="gradnorm"
    )
    torch.testing.assert_close(rank0["params"], rank1["params"], atol=0, rtol=0)
    torch.testing.assert_close(single["params"], rank0["params"], atol=1e-5, rtol=0)
    for task in ("a", "b", "c"):
        assert single["weights"][task] == pytest.approx(rank0["weights"][task], abs=1e-5)


# ------------------------------------------------------------------------------------------ hand-computed merges
def test_excess_mtl_writes_the_present_weights_back_at_their_share_of_t():
    # w = (1.5, 0.5, 1.0), b absent: the present tasks a, c hold 2.5 of T = 3. Their step (a problem of 2
    # tasks) gives weights (1.6, 0.4), summing to |P| = 2; written back at their share: (1.6, 0.4)·2.5/2 =
    # (2.0, 0.5). So w = (2.0, 0.5, 0.5): Σ = 3, b's 0.5 untouched.
    strategy = ExcessMTL()
    strategy.bind([Task("a"), Task("b"), Task("c")])
    P = 4
    full = {
        "sq_grad_sum": torch.ones(3, P),
        "baseline": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
        "log_weights": torch.tensor([1.5, 0.5, 1.0], dtype=torch.float64).log(),
    }
    narrowed = {
        "sq_grad_sum": torch.full((2, P), 5.0),
        "baseline": torch.tensor([7.0, 9.0], dtype=torch.float64),
        "log_weights": torch.tensor([1.6, 0.4], dtype=torch.float64).log(),
    }
    merged = strategy.merge_present_state(full, narrowed, [0, 2])
    torch.testing.assert_close(
        merged["log_weights"].exp(), torch.tensor([2.0, 0.5, 0.5], dtype=torch.float64)
    )
    assert torch.equal(merged["log_weights"][1], full["log_weights"][1])
    assert merged["baseline"].tolist() == [7.0, 2.0, 9.0]
    assert merged["sq_grad_sum"][:, 0].tolist() == [5.0, 1.0, 5.0]
    # the first update, with b absent: b gets S = 0, e⁰ unset, w = 1; a and c hold 2 of 3 → (1.6, 0.4)
    merged = strategy.merge_present_state({k: None for k in full}, narrowed, [0, 2])
    torch.testing.assert_close(
        merged["log_weights"].exp(), torch.tensor([1.6, 1.0, 0.4], dtype=torch.float64)
    )
    assert merged["baseline"].tolist() == [7.0, 0.0, 9.0] and not merged["sq_grad_sum"][1].any()


def test_moco_keeps_lambda_on_the_simplex_with_the_absent_share_untouched():
    # λ = (0.5, 0.2, 0.3), b absent: a and c hold 0.8; their step on their own simplex gives (0.25, 0.75),
    # written back as 0.8·(0.25, 0.75) = (0.2, 0.6): λ = (0.2, 0.2, 0.6), Σ = 1.
    strategy = MoCo()
    strategy.bind([Task("a"), Task("b"), Task("c")])
    full = {
        "tracked": torch.zeros(3, 2),
        "lambdas": torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64),
        "step": 4,
    }
    narrowed = {
        "tracked": torch.ones(2, 2),
        "lambdas": torch.tensor([0.25, 0.75], dtype=torch.float64),
        "step": 5,
    }
    merged = strategy.merge_present_state(full, narrowed, [0, 2])
    torch.testing.assert_close(merged["lambdas"], torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64))
    assert merged["step"] == 5 and merged["tracked"][:, 0].tolist() == [1.0, 0.0, 1.0]
    # and the narrowed step starts from the present λ rescaled to their simplex: (0.5, 0.3)/0.8
    seen = {}
    strategy.load_method_state(full, None)
    strategy._on_present_tasks([0, 2], lambda: seen.setdefault("lambdas", strategy.lambdas.clone()))
    torch.testing.assert_close(seen["lambdas"], torch.tensor([0.625, 0.375], dtype=torch.float64))
    torch.testing.assert_close(strategy.lambdas, full["lambdas"])  # nothing moved: merged back as it was


@pytest.mark.parametrize("name", ["GradNorm", "ExcessMTL", "MoCo", "GradVac", "MoDo"])
def test_resume_with_absent_steps_matches_uninterrupted(tmp_path, name):
    # c absent at batches 0 and 2 of every epoch (so also at the very first update): stop after epoch 1,
    # resume from the checkpoint (tensors and primitives only) == the uninterrupted run
    make, _ = STRATEGIES[name]
    data = loader(make_data(n=64), 16)
    straight, s_straight = AbsentNet(absent={0, 2}, optimizer="adam", lr=0.01), make()
    trainer(max_epochs=2, callbacks=[s_straight]).fit(straight, data)
    first = AbsentNet(absent={0, 2}, optimizer="adam", lr=0.01)
    t1 = trainer(max_epochs=1, callbacks=[make()])
    t1.fit(first, data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    torch.load(tmp_path / "half.ckpt", weights_only=True)
    resumed, s_resumed = AbsentNet(absent={0, 2}, optimizer="adam", lr=0.01), make()
    trainer(max_epochs=2, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), atol=1e-6, rtol=0)
    for a, b in zip(_c_state(s_resumed), _c_state(s_straight)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
