"""Many tasks (issue 11, section 4): every strategy trains at T = 100, a cheap subset at T = 400, and the
solvers made fast for many tasks agree with their definitions.

The fits are deliberately tiny (a 6 → 16 encoder, 100 linear heads, two steps of batch 24): they check
that nothing breaks, overflows or takes quadratic memory at T = 100, not the methods' quality.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from helpers import TinyNet, loader, make_data, trainer
from torch import Tensor
from torchmetrics.classification import BinaryAccuracy

from lightning_mtl import Task
from lightning_mtl.cli.registry import available_strategies
from lightning_mtl.functional._linalg import normalize_by_trace, psd_part
from lightning_mtl.functional._qp import solve_bounded_qp
from lightning_mtl.strategies._auxiliary import AuxiliaryWeighting

pcgrad_module = importlib.import_module("lightning_mtl.functional.pcgrad")
gradvac_module = importlib.import_module("lightning_mtl.functional.gradvac")
mgda_module = importlib.import_module("lightning_mtl.functional.mgda")
upgrad_module = importlib.import_module("lightning_mtl.functional.upgrad")
dualproj_module = importlib.import_module("lightning_mtl.functional.dualproj")

F64 = torch.float64
BATCH = 24  # divisible by 3: MoDo and SDMGrad split the batch into three parts


def _dataset_loss(model: TinyNet, data: torch.utils.data.TensorDataset) -> float:
    """Sum over tasks of the mean squared error on the whole data set."""
    x, y = data.tensors
    with torch.no_grad():
        z = model.encoder(x)
        return float(
            sum(
                torch.nn.functional.mse_loss(model.heads[t](z).squeeze(1), y[:, i])
                for i, t in enumerate(model.task_names)
            )
        )


class ManyNet(TinyNet):
    """:class:`TinyNet` that marks its encoder output (GradDrop and representation modes need it) and, with
    ``kpi=True``, gives every task an accuracy metric and returns ``(preds, target)`` for it (DTP needs a
    KPI per task)."""

    def __init__(self, num_tasks: int, kpi: bool = False, auxiliary: bool = False) -> None:
        names = [f"t{i}" for i in range(num_tasks)]
        tasks: list = [Task(n, metrics={"acc": BinaryAccuracy()}) for n in names] if kpi else names
        if auxiliary:  # t0 is the result, the others help it
            tasks = [Task("t0")] + [Task(n, role="auxiliary") for n in names[1:]]
        super().__init__(tasks=tasks, hidden=16, lr=1e-2, optimizer="adam")
        self.kpi = kpi

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.shared_representation(self.encoder(x))
        preds = {t: self.heads[t](z).squeeze(1) for t in self.task_names}
        losses = {t: torch.nn.functional.mse_loss(preds[t], y[:, i]) for i, t in enumerate(self.task_names)}
        if not self.kpi:
            return losses
        outputs = {
            t: ((preds[t] > 0).long().detach(), (y[:, i] > 0).long()) for i, t in enumerate(self.task_names)
        }
        return losses, outputs


NEEDS_KPI = {"DTP"}  # strategies whose tasks need metrics (a KPI in [0, 1])
# auxiliary-learning strategies (GCS, OLAUX, HydaLearn) need a main task and auxiliary ones: t0 and the rest


def _fit(name: str, num_tasks: int) -> tuple[float, float, TinyNet]:
    data = make_data(n=2 * BATCH, in_dim=6, num_tasks=num_tasks)
    cls = available_strategies()[name]
    model = ManyNet(num_tasks, kpi=name in NEEDS_KPI, auxiliary=issubclass(cls, AuxiliaryWeighting))
    before = _dataset_loss(model, data)
    strategy = cls()
    trainer(max_epochs=1, callbacks=[strategy]).fit(model, loader(data, batch_size=BATCH))
    return before, _dataset_loss(model, data), model


def _check_fit(name: str, num_tasks: int) -> None:
    before, after, model = _fit(name, num_tasks)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert bool(torch.isfinite(params).all()), f"{name} at T = {num_tasks}: non-finite parameters"
    assert math.isfinite(after), f"{name} at T = {num_tasks}: non-finite loss"
    # two Adam steps of lr 1e-2 cannot move a sane method far: the loss stays within 10 % of where it began
    assert after <= 1.1 * before, f"{name} at T = {num_tasks}: loss {before:.4g} -> {after:.4g}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(available_strategies()))
def test_every_strategy_trains_at_100_tasks(name: str) -> None:
    _check_fit(name, 100)


T400 = ("EqualWeighting", "DWA", "MGDA", "IMTLG")  # UPGrad at T = 400 (rank-deficient G): ~8 s a step here


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", [n for n in T400 if n in available_strategies()])
def test_cheap_strategies_train_at_400_tasks(name: str) -> None:
    _check_fit(name, 400)


# ---------------------------------------------------------------------------------------------- solvers
def _kkt_violation(Q: Tensor, q: Tensor, lower: Tensor, x: Tensor) -> float:
    """Largest violation of the KKT conditions of ``min ½xᵀQx + qᵀx, x ≥ lower`` (relative to the data):
    feasibility, gradient zero where ``x > lower`` and non-negative where ``x = lower``."""
    grad = x @ Q + q
    scale = float(q.abs().max() + Q.abs().max() * x.abs().max() + lower.abs().max())
    slack = x - lower
    at_bound = slack <= 1e-12 * scale
    violation = torch.cat(
        [(-slack).clamp_min(0).flatten(), grad[~at_bound].abs(), (-grad[at_bound]).clamp_min(0)]
    )
    return float(violation.max()) / scale


def _gramian(T: int, P: int, seed: int) -> Tensor:
    J = torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return J @ J.T


@pytest.mark.parametrize(("T", "P"), [(100, 300), (100, 60), (160, 400)])
def test_batched_qp_meets_the_kkt_conditions_at_many_tasks(T: int, P: int) -> None:
    """UPGrad's T problems (``lower = eᵢ/T``) on full-rank and rank-deficient Gramians (P < T, ridge 1e-4):
    every row is the unique (strictly convex) minimiser, so it equals what any exact solver returns."""
    Q = psd_part(normalize_by_trace(_gramian(T, P, seed=T + P))[0]) + 1e-4 * torch.eye(T, dtype=F64)
    lower = torch.eye(T, dtype=F64) / T
    q = torch.zeros(T, T, dtype=F64)
    x, free = solve_bounded_qp(Q, q, lower)
    assert _kkt_violation(Q, q, lower, x) < 1e-9
    assert bool((free == (x > lower)).all())


def test_batched_qp_with_mixed_free_set_sizes() -> None:
    """Rows whose free sets differ in size (padding of the gathered systems) and rows with none."""
    T = 50
    g = torch.Generator().manual_seed(3)
    M = torch.randn(T, T + 5, generator=g, dtype=F64)
    Q = M @ M.T / T + 1e-3 * torch.eye(T, dtype=F64)
    q = torch.randn(6, T, generator=g, dtype=F64) * torch.tensor([0.0, 1.0, 10.0, 0.01, 1.0, 1.0])[:, None]
    lower = torch.randn(6, T, generator=g, dtype=F64)
    lower[4] = 10.0  # far above the unconstrained minimiser: most bounds active
    lower[5] = -1e3  # far below: no bound active
    x, _ = solve_bounded_qp(Q, q, lower)
    assert _kkt_violation(Q, q, lower, x) < 1e-9
    torch.testing.assert_close(x[5], torch.linalg.solve(Q, -q[5]))


@pytest.mark.parametrize("T", [30, 100])
def test_upgrad_and_dualproj_match_torchjd_at_many_tasks(T: int) -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("qpsolvers")
    pytest.importorskip("quadprog")
    G = _gramian(T, 3 * T, seed=T)
    for ours, theirs in [
        (upgrad_module.upgrad_weights(G), aggregation.UPGradWeighting()(G)),
        (dualproj_module.dualproj_weights(G), aggregation.DualProjWeighting()(G)),
    ]:
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours, theirs.to(F64), rtol=1e-6, atol=1e-6 * scale)


def _mgda_by_qp(G: Tensor) -> Tensor:
    """MGDA through the generic QP (what ``mgda_weights`` did at T = 2 before its closed form)."""
    Q = psd_part(normalize_by_trace(G)[0]) + 1e-10 * torch.eye(G.shape[0], dtype=F64)
    x, _ = solve_bounded_qp(Q, -torch.ones(1, G.shape[0], dtype=F64), torch.zeros(1, G.shape[0], dtype=F64))
    return x[0] / x[0].sum()


@pytest.mark.parametrize("seed", range(12))
def test_mgda_closed_form_at_two_tasks_matches_the_qp(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(2, 7, generator=g, dtype=F64)
    if seed % 3 == 1:  # opposite gradients of different norms: the weights are interior
        J[1] = -(1.0 + seed) * J[0]
    if seed % 3 == 2:  # parallel gradients: the weight goes to the shorter one (a vertex of the simplex)
        J[1] = 3.0 * J[0]
    G = J @ J.T
    torch.testing.assert_close(mgda_module.mgda_weights(G), _mgda_by_qp(G), rtol=1e-9, atol=1e-12)


def test_mgda_closed_form_by_hand() -> None:
    # g1 = (1, 0), g2 = (0, 2): γ = (G22 − G12)/(G11 + G22 − 2G12) = 4/5, so d = (0.8, 0.4), which is
    # orthogonal to g1 − g2 = (1, −2): the minimum-norm point of the segment.
    G = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=F64)
    torch.testing.assert_close(
        mgda_module.mgda_weights(G), torch.tensor([0.8, 0.2], dtype=F64), rtol=1e-8, atol=0
    )
    # g2 = 2·g1: the shorter one, g1, is the minimum-norm point
    G = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=F64)
    torch.testing.assert_close(mgda_module.mgda_weights(G), torch.tensor([1.0, 0.0], dtype=F64))


def _pcgrad_reference(J: Tensor, orders: Tensor) -> Tensor:
    """Yu et al. (2020), Algorithm 1, on explicit gradient vectors (``orders[i]``: task i's order)."""
    T = J.shape[0]
    total = torch.zeros(J.shape[1], dtype=J.dtype)
    for i in range(T):
        g = J[i].clone()
        for j in orders[i].tolist():
            if j == i:
                continue
            dot = g @ J[j]
            if dot < 0 and J[j] @ J[j] > 0:
                g = g - dot / (J[j] @ J[j]) * J[j]
        total += g
    return total


@pytest.mark.parametrize("T", [3, 40])
def test_pcgrad_weights_match_the_algorithm_on_vectors(T: int) -> None:
    J = torch.randn(T, 2 * T, generator=torch.Generator().manual_seed(T), dtype=F64)
    J[1] = 0.0  # a zero gradient is never projected on
    generator = torch.Generator().manual_seed(5)
    orders = torch.stack([torch.randperm(T, generator=generator) for _ in range(T)])
    w = pcgrad_module.pcgrad_weights(J @ J.T, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(J.T @ w, _pcgrad_reference(J, orders), rtol=1e-9, atol=1e-9)


def test_gradvac_targets_are_updated_once_per_pair() -> None:
    """Each pair (i, j ≠ i) is visited once per call: every off-diagonal target is a cosine, the diagonal is
    never touched (the targets are gathered and written back once, outside the loop)."""
    T = 12
    J = torch.randn(T, 30, generator=torch.Generator().manual_seed(0), dtype=F64)
    G = J @ J.T
    result = gradvac_module.gradvac_weights(G, beta=1.0, generator=torch.Generator().manual_seed(0))
    assert result.targets.shape == (T, T)
    assert bool(torch.isfinite(result.weights).all())
    off = ~torch.eye(T, dtype=torch.bool)
    assert bool((result.targets[off].abs() <= 1).all())
    assert bool((result.targets.diagonal() == 0).all())  # never visited
