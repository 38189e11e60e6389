"""Per-task metrics, Δm%, the gradient-conflict monitor and task affinity under DDP (ddp_spawn, 2 CPU ranks).

With lr=0 the model is fixed, so the epoch's metrics must equal the metrics on the whole data set: a value
computed on one rank's half only (no synchronisation) would differ. The diagnostics use rank-averaged
gradients and losses: 2 ranks x B must match 1 process x 2B on the same (union) batches.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from helpers import make_data, restore_environ, trainer
from test_metrics import MetricNet, expected_metrics
from torch.utils.data import DataLoader, DistributedSampler

from lightning_mtl.callbacks import DeltaM, GradientConflictMonitor, TaskAffinity

B = 8
N = 64
BASELINES = {"a/mae": 0.9, "b/mse": 1.5, "c/loss": 2.0}


class Record(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        monitor = next(cb for cb in trainer.callbacks if isinstance(cb, GradientConflictMonitor))
        affinity = next(cb for cb in trainer.callbacks if isinstance(cb, TaskAffinity))
        record = {
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "cos": monitor.mean_cosine,
            "norms": monitor.mean_norms,
            "affinity": affinity.affinity,
            "count": affinity._count,
        }
        torch.save(record, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def _callbacks(out):
    return [
        GradientConflictMonitor(every_n_steps=1),
        TaskAffinity(every_n_steps=1, lr=0.1),
        DeltaM(BASELINES),
        Record(str(out)),
    ]


@pytest.mark.timeout(240)
def test_metrics_and_diagnostics_synchronised_across_ranks(tmp_path, monkeypatch):
    ds = make_data(n=N)
    val = make_data(n=N, seed=1)
    with restore_environ():
        monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
        (tmp_path / "ddp").mkdir()
        trainer(strategy="ddp_spawn", devices=2, callbacks=_callbacks(tmp_path / "ddp")).fit(
            MetricNet(lr=0.0), DataLoader(ds, batch_size=B), DataLoader(val, batch_size=B)
        )
    (tmp_path / "one").mkdir()
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    trainer(callbacks=_callbacks(tmp_path / "one")).fit(
        MetricNet(lr=0.0),
        DataLoader(ds, batch_size=2 * B, sampler=sampler),
        DataLoader(val, batch_size=2 * B),
    )
    r0, r1 = torch.load(tmp_path / "ddp" / "rank0.pt"), torch.load(tmp_path / "ddp" / "rank1.pt")
    one = torch.load(tmp_path / "one" / "rank0.pt")

    model = MetricNet(lr=0.0)  # same init (TinyNet seeds 0); lr=0 keeps it there
    full_val, full_train = expected_metrics(model, val), expected_metrics(model, ds)
    x, y = val.tensors
    with torch.no_grad():
        half = float((model.predictions(x[0::2])["a"] - y[0::2, 0]).abs().mean())  # rank 0's share alone
    assert abs(half - full_val["a/mae"]) > 1e-3, "test data cannot tell synced from unsynced metrics"
    for record in (r0, r1):
        for key, value in full_val.items():
            assert record["metrics"][f"val/{key}"] == pytest.approx(value, rel=1e-5), key
        for key, value in full_train.items():
            assert record["metrics"][f"train/{key}"] == pytest.approx(value, rel=1e-5), key
    # Δm% from the synchronised values, the same on both ranks and as in one process
    assert r0["metrics"]["val/delta_m"] == pytest.approx(r1["metrics"]["val/delta_m"], abs=1e-9)
    assert r0["metrics"]["val/delta_m"] == pytest.approx(one["metrics"]["val/delta_m"], rel=1e-4)
    # diagnostics: identical on the ranks, equal to one process on the union batches
    for key in ("cos", "norms", "affinity"):
        torch.testing.assert_close(r0[key], r1[key])
        torch.testing.assert_close(r0[key], one[key], atol=1e-5, rtol=1e-4)
    assert r0["count"] == one["count"] == N // (2 * B)
