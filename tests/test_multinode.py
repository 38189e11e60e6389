"""Multi-node training: two "nodes" launched on this machine with ``torchrun --nnodes=2`` (one process each, gloo
on localhost) equal one process at twice the batch, for a loss method, a learnable one and two gradient methods."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TinyNet, flat_params, make_data, restore_environ, trainer
from torch.utils.data import DataLoader, DistributedSampler

from lightning_mtl.cli.registry import make_strategy

STRATEGIES = ("DWA", "UncertaintyWeighting", "PCGrad", "MGDA")
WORKER = Path(__file__).parent / "workers" / "multinode_fit.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_two_nodes_equal_one_process_at_twice_the_batch(tmp_path):
    epochs, batch = 2, 8
    port = _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MASTER_", "RANK", "WORLD_", "LOCAL_", "PL_"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    rendezvous = ["--master-addr=127.0.0.1", f"--master-port={port}"]
    args = [str(WORKER), str(tmp_path), str(epochs), str(batch), ",".join(STRATEGIES)]
    nodes = [
        subprocess.Popen(
            [*torchrun, f"--node-rank={k}", *rendezvous, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in (0, 1)
    ]
    logs = [p.communicate(timeout=540)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(log[-3000:] for log in logs)

    ds = make_data(n=64)
    with restore_environ():
        os.environ.pop("PL_GLOBAL_SEED", None)
        for name in STRATEGIES:
            strategy = make_strategy(name)
            model = TinyNet(optimizer="adam", lr=0.01)
            sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
            trainer(max_epochs=epochs, callbacks=[strategy]).fit(
                model, DataLoader(ds, batch_size=2 * batch, sampler=sampler)
            )
            saved = torch.load(tmp_path / f"{name}.pt", weights_only=False)
            assert saved["node_rank"] == 0
            torch.testing.assert_close(saved["params"], flat_params(model), atol=1e-5, rtol=0, msg=name)
            for task, w in strategy.weights.items():
                assert saved["weights"][task] == pytest.approx(w, abs=1e-5), name
