"""Exactness under DDP of the gradient strategies: 2 ranks x batch B == 1 process x batch 2B."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    RecordState,
    RepTinyNet,
    TinyNet,
    ddp_parity_records,
    load_record,
    make_data,
    restore_environ,
    trainer,
)
from torch.utils.data import DataLoader

from lightning_mtl.strategies.cagrad import CAGrad
from lightning_mtl.strategies.mgda import MGDA
from lightning_mtl.strategies.nash_mtl import NashMTL
from lightning_mtl.strategies.pcgrad import PCGrad
from lightning_mtl.strategies.upgrad import UPGrad

EPOCHS = 2
B = 8

# name -> (strategy factory, model factory); one ddp_spawn fit each (~5 s)
CASES = {
    "pcgrad-accumulate": (lambda: PCGrad(seed=3), lambda: TinyNet(accumulate_grad_batches=2)),
    "mgda": (lambda: MGDA(), lambda: TinyNet()),
    "mgda-ub": (lambda: MGDA(mode="representation"), lambda: RepTinyNet(accumulate_grad_batches=2)),
    "cagrad": (lambda: CAGrad(c=0.4), lambda: TinyNet()),
    "nash": (lambda: NashMTL(update_every=2), lambda: TinyNet()),  # default solver tolerance
    "upgrad": (lambda: UPGrad(), lambda: TinyNet()),
}


# MGDA and UPGrad are also exact under DDP with uneven label counts (test_partial_labels.py), and CAGrad takes the
# same Gramian path: their full-label cases run with `make test-all`
_EXTRA = {"mgda", "upgrad", "cagrad"}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.ddp_extra if n in _EXTRA else ()) for n in CASES]
)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, name):
    make_strategy, make_model = CASES[name]
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, make_strategy, epochs=EPOCHS, batch_size=B, model=make_model, tag=name
    )
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    assert rank0["global_step"] == single["global_step"] > 0
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, abs=1e-5), task
    # the method did something else than equal weighting
    assert any(abs(w - single["weights"]["a"]) > 1e-3 for w in single["weights"].values())


@pytest.mark.timeout(240)
def test_local_sync_runs_and_keeps_ranks_identical(tmp_path, monkeypatch):
    with restore_environ():
        monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
        out = tmp_path / "local"
        out.mkdir()
        strategy = NashMTL(sync="local")
        t = trainer(
            strategy="ddp_spawn", devices=2, max_epochs=1, callbacks=[strategy, RecordState(str(out))]
        )
        t.fit(TinyNet(), DataLoader(make_data(n=64), batch_size=B))
        rank0, rank1 = load_record(str(out), 0), load_record(str(out), 1)
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    torch.testing.assert_close(
        rank0["state"]["state"]["method"]["alpha"], rank1["state"]["state"]["method"]["alpha"]
    )
    assert all(torch.isfinite(torch.tensor(list(rank0["weights"].values()))))
