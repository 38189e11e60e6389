"""Exactness under DDP: 2 ranks x batch B == 1 process x batch 2B, for every loss-weighting strategy."""

from __future__ import annotations

import pytest
import torch
from helpers import ddp_parity_records

from lightning_mtl.strategies import DWA, GLS, RLW, EqualWeighting, StaticWeighting, UncertaintyWeighting

EPOCHS = 4  # DWA's weights differ from 1 from the third epoch on
B = 8


def _strategies():
    return {
        "equal": lambda: EqualWeighting(),
        "static": lambda: StaticWeighting({"a": 0.5, "b": 2.0, "c": 1.0}),
        "uncertainty": lambda: UncertaintyWeighting(lr=0.1),
        "dwa": lambda: DWA(temperature=2.0),
        "rlw": lambda: RLW(seed=3),
        "gls": lambda: GLS(),
    }


# equal, static, uncertainty and DWA are also exact under DDP with uneven label counts
# (test_partial_labels.py, test_partial_loss_strategies.py): their full-label cases run with `make test-all`
_EXTRA = {"equal", "static", "uncertainty", "dwa"}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.ddp_extra if n in _EXTRA else ()) for n in _strategies()]
)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, name):
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, _strategies()[name], epochs=EPOCHS, batch_size=B, tag=name
    )
    # identical parameters and strategy state on every rank
    assert torch.equal(rank0["params"], rank1["params"])
    assert rank0["weights"] == rank1["weights"]
    assert rank0["global_step"] == single["global_step"] == EPOCHS * 64 // (2 * B)
    # the same update as one process on the union of the ranks' batches
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, abs=1e-5), task
    if name == "dwa":
        assert any(abs(w - 1) > 1e-3 for w in single["weights"].values()), "DWA weights never left 1"
