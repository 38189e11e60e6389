"""IMTL-L and IMTL under DDP: 2 ranks × batch B ≡ 1 process × batch 2B (same permutation), 3 epochs."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    RepTinyNet,
    TinyNet,
    ddp_parity_records,
)

from lightning_mtl.strategies import IMTL, IMTLL

EPOCHS = 3
B = 8

# name -> (strategy factory, model factory); one ddp_spawn fit each (~5 s)
CASES = {
    "imtll": (lambda: IMTLL(lr=0.1), lambda: TinyNet()),
    "imtl": (lambda: IMTL(optimizer="adam", lr=0.05), lambda: TinyNet()),
    "imtl-rep-accumulate": (
        lambda: IMTL(mode="representation"),
        lambda: RepTinyNet(accumulate_grad_batches=2),
    ),
}


def _s(record) -> torch.Tensor:
    return record["state"]["state"]["learnable"]["values"]


@pytest.mark.timeout(240)
# (IMTL's hybrid is IMTL-L + IMTL-G, each exact below: its own case runs with `make test-all`)
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.ddp_extra if n == "imtl" else ()) for n in CASES]
)
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, name):
    make_strategy, make_model = CASES[name]
    single, rank0, rank1 = ddp_parity_records(
        tmp_path, make_strategy, epochs=EPOCHS, batch_size=B, model=make_model, tag=name
    )
    assert torch.equal(rank0["params"], rank1["params"])
    assert torch.equal(_s(rank0), _s(rank1))
    assert rank0["weights"] == rank1["weights"]
    assert rank0["global_step"] == single["global_step"] > 0
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_s(rank0), _s(single), atol=1e-5, rtol=1e-5)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, abs=1e-5), task
    assert _s(single).abs().min() > 1e-3, "s never moved: the test would not see a wrong gradient of s"
