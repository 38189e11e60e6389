"""Partial labels with independent gradient samples (MoDo, SDMGrad: ``batch_parts = 3``).

Each part's loss is the mean over its labelled samples, exact over DDP ranks; a task labelled in some parts of
the step but not in others takes, in those parts, its gradient over all its labelled samples (warned once); a
task labelled nowhere in the step is absent (weight 0, state untouched: ``test_partial_gradient_strategies``).
"""

from __future__ import annotations

import pytest
import torch
from helpers import TinyNet, ddp_parity_records, loader, make_data, single_process_batches, trainer
from torch import Tensor, nn

from lightning_mtl import Task, masked_mean
from lightning_mtl.functional.modo import modo_weights
from lightning_mtl.strategies.modo import MoDo
from lightning_mtl.strategies.sdmgrad import SDMGrad


class FirstThirdLabels(TinyNet):
    """Tasks a (every sample) and b (partial: labelled on the batch's first ``labelled`` samples only, so with
    ``batch_parts = 3`` and ``labelled`` ≤ a third of the batch, only in part 0)."""

    def __init__(self, labelled: int = 4, **kwargs) -> None:
        super().__init__(tasks=("a", Task("b", partial=True)), **kwargs)
        self.labelled = labelled
        self.seen: list[int] = []  # the first sample index of each part task_losses sees

    def task_losses(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.append(int(idx[0]))
        z = self.encoder(x)
        a, b = (self.heads[t](z).squeeze(1) for t in ("a", "b"))
        return {
            "a": nn.functional.mse_loss(a, y[:, 0]),
            "b": masked_mean((b - y[:, 1]) ** 2, idx % 12 < self.labelled),
        }


def _data(n: int = 12):
    x, y = make_data(n=n).tensors
    return torch.utils.data.TensorDataset(x, y, torch.arange(n))


def _jacobian(net: TinyNet, losses: Tensor) -> Tensor:
    params = list(net.encoder.parameters())
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, params, retain_graph=True)]) for L in losses
    ]
    return torch.stack(rows)


def test_a_task_labelled_in_one_part_only_uses_its_labelled_gradient_in_every_part():
    # batch of 12 → parts of 4; b labelled on samples 0..3 (part 0 only). MoDo's λ step uses J₁J₂ᵀλ with
    # b's row of part 1 replaced by its gradient over its labelled samples (part 0's row), and the shared
    # update is J₃ᵀλ with b's row of part 2 replaced likewise; the heads get ∇(L_a + L_b) of the whole batch.
    gamma, lr = 0.5, 0.1
    net = FirstThirdLabels(lr=lr)
    reference = FirstThirdLabels(lr=lr)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    strategy = MoDo(gamma=gamma, rho=0.0, samples=3)
    with pytest.warns(
        RuntimeWarning, match=r"MoDo: task\(s\) \['b'\] had no labelled sample in some of the 3"
    ):
        trainer(max_steps=1, callbacks=[strategy]).fit(net, loader(_data(), 12))
    assert net.seen == [0, 4, 8]

    x, y, idx = _data().tensors
    parts = []
    for s in (slice(0, 4), slice(4, 8), slice(8, 12)):
        z = reference.encoder(x[s])
        a = nn.functional.mse_loss(reference.heads["a"](z).squeeze(1), y[s, 0])
        b = ((reference.heads["b"](z).squeeze(1) - y[s, 1]) ** 2).mean() if s.start == 0 else a * 0
        parts.append(_jacobian(reference, torch.stack([a, b])))
    J1, J2, J3 = parts
    J2[1], J3[1] = J1[1], J1[1]  # b's missing rows: its labelled gradient
    lam = modo_weights((J1 @ J2.T).double(), None, gamma=gamma, rho=0.0)
    torch.testing.assert_close(strategy.lambdas, lam, atol=1e-6, rtol=0)
    assert abs(float(lam[0]) - 0.5) > 1e-3  # the step moved λ
    d = J3.T.double() @ lam
    shared_before = torch.cat([before[k].reshape(-1) for k in ("encoder.0.weight", "encoder.0.bias")])
    shared_after = torch.cat([p.detach().reshape(-1) for p in net.encoder.parameters()])
    torch.testing.assert_close(shared_after, shared_before - lr * d.float(), atol=1e-6, rtol=0)
    # the heads: a's over all 12 samples, b's over its 4 labelled ones
    z = reference.encoder(x).detach()
    L_b = ((reference.heads["b"](z).squeeze(1)[:4] - y[:4, 1]) ** 2).mean()
    grad_b = torch.autograd.grad(L_b, reference.heads["b"].weight)[0]
    torch.testing.assert_close(net.heads["b"].weight.detach(), before["heads.b.weight"] - lr * grad_b)


def test_a_task_labelled_in_every_part_gives_no_warning():
    import warnings

    net = FirstThirdLabels(labelled=12)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*had no labelled sample in some of the.*")
        trainer(max_steps=2, callbacks=[SDMGrad()]).fit(net, loader(_data(24), 12))


class SparseB(TinyNet):
    """Task b labelled where ``x[:, 0] > 0.8`` (uneven counts per rank and per part; some parts and some
    global batches have none)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(tasks=("a", Task("b", partial=True), "c"), **kwargs)

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        out = {t: self.heads[t](z).squeeze(1) for t in self.task_names}
        return {
            "a": nn.functional.mse_loss(out["a"], y[:, 0]),
            "b": masked_mean((out["b"] - y[:, 1]) ** 2, x[:, 0] > 0.8),
            "c": nn.functional.mse_loss(out["c"], y[:, 2]),
        }


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:.*had no labelled sample in some of the.*")
def test_modo_uneven_label_counts_per_rank_and_part_are_exact_under_ddp(tmp_path):
    # 2 ranks × 6 ≡ 1 process × 12: every part's labelled mean is the one of the union of the ranks' parts
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, lambda: MoDo(gamma=0.5), epochs=3, batch_size=6, n=48, model=SparseB, tag="modo-partial"
    )
    assert torch.equal(rank0["params"], rank1["params"])
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=0)
    l0 = rank0["state"]["state"]["method"]["lambda"]
    torch.testing.assert_close(l0, single["state"]["state"]["method"]["lambda"], atol=1e-5, rtol=0)
    assert float(l0.sum()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.ddp_extra  # the single-process exactness is test_batch_parts' zero-direction test
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:.*had no labelled sample in some of the.*")
def test_modo_with_accumulation_and_label_counts_changing_within_a_window_is_exact_under_ddp(tmp_path):
    # windows of 2 micro-batches whose parts hold different shares of b's labels: the window's Jacobian (the
    # heads' correction, the missing parts' rows) takes each micro-batch's shares; the ranks' differences from
    # the first micro-batch's shares are reduced once (missing rows) or averaged by DDP (heads' correction).
    # test_batch_parts checks the exactness of that correction on one process (a zero direction stays zero)
    single, rank0, rank1 = ddp_parity_records(
        tmp_path,
        lambda: MoDo(gamma=0.5, samples=3),
        epochs=2,
        batch_size=6,
        n=48,
        model=lambda: SparseB(accumulate_grad_batches=2),
        tag="modo-partial-accumulate",
    )
    assert torch.equal(rank0["params"], rank1["params"])
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=0)


def test_the_sparse_model_has_parts_without_labels_and_absent_batches():
    # what the DDP test relies on: among the single process's parts of 4 (batches of 12, in the sampler's
    # order), some have no label of b while their batch has some, and some batches have none at all
    ds = make_data(n=48)
    part_missing = absent = 0
    for batch in single_process_batches(ds, batch_size=12, epochs=3):
        per_part = (ds.tensors[0][batch, 0] > 0.8).view(3, 4).sum(1)
        absent += int(per_part.sum() == 0)
        part_missing += int(per_part.sum() > 0 and bool((per_part == 0).any()))
    assert part_missing > 0 and absent > 0
