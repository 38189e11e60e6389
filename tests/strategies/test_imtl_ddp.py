"""IMTL-L and IMTL under DDP: 2 ranks × batch B ≡ 1 process × batch 2B (same permutation), 3 epochs."""

from __future__ import annotations

import pytest
import torch
from helpers import RecordState, RepTinyNet, TinyNet, load_record, make_data, restore_environ, trainer
from torch.utils.data import DataLoader, DistributedSampler

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


def _fit(tmp_path, name: str, devices: int):
    make_strategy, make_model = CASES[name]
    ds = make_data(n=64)
    out = tmp_path / f"{name}-{devices}"
    out.mkdir()
    kwargs = dict(max_epochs=EPOCHS, callbacks=[make_strategy(), RecordState(str(out))])
    if devices == 1:
        # the permutation Lightning's injected DistributedSampler gives the ranks (seed 0)
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
        trainer(**kwargs).fit(make_model(), DataLoader(ds, batch_size=2 * B, sampler=sampler))
        return [load_record(str(out))]
    trainer(strategy="ddp_spawn", devices=2, **kwargs).fit(make_model(), DataLoader(ds, batch_size=B))
    return [load_record(str(out), 0), load_record(str(out), 1)]


def _s(record) -> torch.Tensor:
    return record["state"]["state"]["learnable"]["values"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, monkeypatch, name):
    with restore_environ():
        monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
        single = _fit(tmp_path, name, 1)[0]
        rank0, rank1 = _fit(tmp_path, name, 2)
    assert torch.equal(rank0["params"], rank1["params"])
    assert torch.equal(_s(rank0), _s(rank1))
    assert rank0["weights"] == rank1["weights"]
    assert rank0["global_step"] == single["global_step"] > 0
    torch.testing.assert_close(rank0["params"], single["params"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_s(rank0), _s(single), atol=1e-5, rtol=1e-5)
    for task, w in single["weights"].items():
        assert rank0["weights"][task] == pytest.approx(w, abs=1e-5), task
    assert _s(single).abs().min() > 1e-3, "s never moved: the test would not see a wrong gradient of s"
