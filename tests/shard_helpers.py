"""What the sharded-model tests (FSDP2: ``test_sharded_gramian.py``, FSDP1: ``test_flat_sharded.py``) share: the
tiny MLP, its global batch, the three reference steps taken by one process, and the torchrun launch of a test
file's Lightning ranks with the one-process runs they are compared to."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from helpers import RepTinyNet, TinyNet, flat_params, make_data, restore_environ, trainer
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_mtl.functional.mgda import mgda_weights
from lightning_mtl.functional.pcgrad import pcgrad_weights
from lightning_mtl.functional.upgrad import upgrad_weights
from lightning_mtl.gradients import gramian, jacobian

T, B, LR = 3, 8, 0.5
#: the three steps' heads: UPGrad with plain heads, MGDA with weighted heads, PCGrad with plain heads
HEADS = ("plain", "weighted", "plain")


class Net(nn.Module):
    """A trunk of two layers (the shared parameters) and three one-row heads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(T))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return torch.cat([h(z) for h in self.heads], dim=1)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``B`` samples; tasks 0 and 1 conflict."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, generator=g)
    y = torch.stack([x[:, 0], -x[:, 0] + 0.5, x[:, 1] * x[:, 2]], dim=1)
    return x, y


def rank_batch(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s consecutive share of :func:`data`."""
    x, y = data()
    per = B // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def losses(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((net(x) - y) ** 2).mean(dim=0)  # [T]


def weights(step: int, G: torch.Tensor) -> torch.Tensor:
    """Step 0: UPGrad's weights; 1: MGDA's; 2: PCGrad's (seeded)."""
    if step == 0:
        return upgrad_weights(G)
    if step == 1:
        return mgda_weights(G)
    return pcgrad_weights(G, generator=torch.Generator().manual_seed(3))


def reference() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """One process, the whole batch: the Gramians and the parameters after each of the three steps."""
    net = Net()
    x, y = data()
    grams, params = [], []
    for step in range(3):
        L = losses(net, x, y)
        shared = list(net.trunk.parameters())
        J = jacobian(L, shared)
        G = gramian(J)
        w = weights(step, G).to(L)
        net.zero_grad()
        if HEADS[step] == "weighted":
            (w * L).sum().backward()
        else:  # heads ∇ΣLᵢ, shared Jᵀw
            c = (w - 1) @ J
            total, offset = L.sum(), 0
            for p in shared:
                total = total + (p * c[offset : offset + p.numel()].view_as(p)).sum()
                offset += p.numel()
            total.backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= LR * p.grad
        grams.append(G)
        params.append([p.detach().clone() for p in net.parameters()])
    return grams, params


def error_of(call: Callable[[], Any], expected: type[Exception]) -> str:
    """The message of the ``expected`` error ``call()`` raises (another error propagates), or ``""`` if none: what a
    spawned rank records for the parent to assert on."""
    try:
        call()
    except expected as err:
        return str(err)
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(test_file: str, *args: Any) -> None:
    """Run ``test_file``'s ``__main__`` on 2 CPU ranks by torchrun (gloo), in a clean environment; assert success."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MASTER_", "RANK", "WORLD_", "LOCAL_", "PL_"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        test_file,
        *map(str, args),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def model_class(model: bool | type) -> type:
    """A configuration's model: ``False`` :class:`TinyNet`, ``True`` :class:`RepTinyNet` (representation mode), or
    the class given."""
    if isinstance(model, type):
        return model
    return RepTinyNet if model else TinyNet


def module_and_batch(kwargs: dict[str, Any], batch: int) -> tuple[dict[str, Any], int]:
    """A configuration's module arguments and per-rank batch size (``kwargs["batch_size"]``, default
    ``batch``; the loaders drop a last incomplete batch, so that every step's parts split evenly)."""
    module_kwargs = {k: v for k, v in kwargs.items() if k != "batch_size"}
    return module_kwargs, int(kwargs.get("batch_size", batch))


def one_process_runs(
    configs: dict[str, tuple[Callable[[], Any], bool | type, dict[str, Any]]], epochs: int, batch: int
) -> dict[str, tuple[torch.Tensor, dict[str, float]]]:
    """label -> (flat parameters, strategy weights) of one process x twice the per-rank batch per step, the permutation
    Lightning's ``DistributedSampler`` gives the ranks (seed 0), for each ``(strategy factory, model (see
    :func:`model_class`), module arguments)``."""
    ds = make_data(n=64)
    out = {}
    with restore_environ():
        os.environ.pop("PL_GLOBAL_SEED", None)
        for label, (factory, model_kind, kwargs) in configs.items():
            strategy = factory()
            module_kwargs, rank_batch_size = module_and_batch(kwargs, batch)
            model = model_class(model_kind)(optimizer="adam", lr=0.01, **module_kwargs)
            sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)  # as Lightning's
            loader = DataLoader(ds, batch_size=2 * rank_batch_size, sampler=sampler, drop_last=True)
            trainer(max_epochs=epochs, callbacks=[strategy]).fit(model, loader)
            out[label] = (flat_params(model), dict(strategy.weights))
    return out


def _rank_main(
    rank: int, body: Callable[[int, int], dict[str, Any]], world: int, port: int, out: str, backend: str
) -> None:
    """One spawned rank: the process group (``backend``; ``nccl`` on GPU ``rank``), ``body(rank, world)``'s record
    saved to ``out/rank<rank>.pt``, the group destroyed."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":  # pragma: no cover - GPU machines only
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        torch.save(body(rank, world), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_two_ranks(
    body: Callable[[int, int], dict[str, Any]], out: Path, backend: str = "gloo"
) -> list[dict[str, Any]]:
    """Run ``body(rank, 2)`` on 2 spawned processes in a process group (``backend``) and return each rank's
    record (``body`` must be a module-level function, to be pickled)."""
    import torch.multiprocessing as mp

    with restore_environ():
        mp.spawn(_rank_main, args=(body, 2, free_port(), str(out), backend), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]
