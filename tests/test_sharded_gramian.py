"""Shard-wise per-task gradients of an FSDP2 (``fully_shard``) model against the unsharded computation.

Two gloo processes, each with half of a global batch of 8, shard a tiny MLP (a trunk of two layers, the shared
parameters, and three one-row heads: rank 1 holds empty shards of them) with ``fully_shard``. On every step the
Gramian built shard by shard equals the unsharded Gramian of the global batch, and three steps — UPGrad with
plain heads (the correction in the one backward, :func:`shard_term`), MGDA with weighted heads (``Σ wᵢLᵢ``
only), PCGrad with plain heads written into the DTensor gradients after the backward
(:func:`add_to_shard_grads`, per-task gradients by blocks) — give the parameters of the same steps taken by one
process on the whole batch, within 1e-5.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from shard_helpers import (
    HEADS,
    LR,
    Net,
    data,
    error_of,
    losses,
    one_process_runs,
    rank_batch,
    reference,
    run_torchrun,
    spawn_two_ranks,
    weights,
)
from torch import nn

from lightning_mtl.gradients import gramian, jacobian
from lightning_mtl.gradients.sharded import (
    ShardLayout,
    add_to_shard_grads,
    auto_block_numel,
    check_fsdp_mesh,
    fsdp_layout,
    shard_combination,
    shard_jacobian,
    shard_term,
    sharded_gramian,
)


def _sharded_steps(rank: int, world: int, device: str) -> dict:
    """The three steps on this rank's half of the batch with ``fully_shard`` over ``device``'s ranks: the
    Gramians, the full parameters after each step (on the CPU) and the shard's width."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world,))
    net = Net().to(device)
    fully_shard(net.trunk, mesh=mesh, reshard_after_forward=False)
    fully_shard(net, mesh=mesh, reshard_after_forward=False)
    sharded_trunk = list(net.trunk.parameters())  # DTensors outside the forward/backward
    layout = fsdp_layout(sharded_trunk)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    x, y = (t.to(device) for t in rank_batch(rank, world))
    grams, params, shard_numels = [], [], []
    for step in range(3):
        opt.zero_grad()
        L = losses(net, x, y)
        shared = list(net.trunk.parameters())  # unsharded (reshard_after_forward=False)
        assert ShardLayout.of(shared) == layout
        J_s = shard_jacobian(L, shared, layout, block_numel=8 if step == 2 else None)
        shard_numels.append(J_s.shape[1])
        G = sharded_gramian(J_s)
        w = weights(step, G.cpu()).to(L)
        if HEADS[step] == "weighted":
            (w * L).sum().backward()
        elif step == 0:  # the correction in the one backward
            (L.sum() + shard_term(shared, shard_combination(J_s, w - 1), layout)).backward()
        else:  # the correction written into the shards' gradients after the backward
            L.sum().backward()
            add_to_shard_grads(sharded_trunk, shard_combination(J_s, w - 1), layout)
        opt.step()
        grams.append(G.cpu())
        params.append([p.full_tensor().detach().cpu() for p in net.parameters()])
    check_fsdp_mesh(net, "test")  # a 1-d mesh of all the ranks: no error
    return {"grams": grams, "params": params, "shard_numels": shard_numels, "numel": layout.numel}


def _worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    record = _sharded_steps(rank, world, "cpu")
    # resharded after the forward (FSDP2's default for a non-root unit): a clear error, not wrong numbers
    other = Net()
    fully_shard(other.trunk, mesh=init_device_mesh("cpu", (world,)))
    fully_shard(other, mesh=init_device_mesh("cpu", (world,)))
    L = losses(other, *rank_batch(rank, world))
    record["error"] = error_of(lambda: shard_jacobian(L, list(other.trunk.parameters())), ValueError)
    return record


@pytest.mark.timeout(300)
def test_sharded_gramian_and_steps_equal_unsharded(tmp_path):
    records = spawn_two_ranks(_worker, tmp_path)
    params = _assert_reference_steps(records)
    for rank, rec in enumerate(records):
        # the rank held only its shard of J: rows 3+3+2+2 of 5·3, 5, 3·5, 3 on rank 0 (P = 38, P_0 = 24, P_1 = 14)
        assert rec["numel"] == 38
        assert rec["shard_numels"] == ([24] * 3 if rank == 0 else [14] * 3)
        assert "reshard_after_forward=False" in rec["error"]
    # the steps moved, and UPGrad's weights were not equal (the tasks conflict)
    assert not torch.allclose(params[0][0], Net().trunk[0].weight)


# ------------------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("d", [1, 2, 5, 7])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layout_matches_torch_chunk(d, world):
    x = torch.arange(d * 2.0).view(d, 2)
    chunks = list(torch.chunk(x, world, dim=0))
    chunks += [x[:0]] * (world - len(chunks))  # FSDP2 pads the split with empty shards
    for r in range(world):
        layout = ShardLayout((torch.Size([d, 2]),), r, world)
        start, stop = layout.rows(0)
        assert torch.equal(x[start:stop], chunks[r])
        assert layout.local_numel == chunks[r].numel()


def test_one_rank_is_the_plain_computation():
    net = Net()
    x, y = data()
    L = losses(net, x, y)
    shared = list(net.trunk.parameters())
    J = jacobian(L, shared)
    layout = ShardLayout.of(shared)
    J_s = shard_jacobian(L, shared, layout, block_numel=16)
    torch.testing.assert_close(J_s, J)
    torch.testing.assert_close(sharded_gramian(J_s), gramian(J))
    w = torch.tensor([0.2, 0.3, 0.5])
    c = shard_combination(J_s, w)
    grads = torch.autograd.grad(shard_term(shared, c, layout), shared)
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads]), w @ J)


def test_auto_block_numel():
    assert auto_block_numel(3, 1000) is None  # small: one batched backward
    assert auto_block_numel(40, 10_000_000) == 1_250_000  # T·P·4 = 1.6 GB: blocks of P/8


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="0-dim"):
        ShardLayout((torch.Size([]),), 0, 1)
    with pytest.raises(ValueError, match="rank"):
        ShardLayout((torch.Size([2]),), 2, 2)
    with pytest.raises(ValueError, match="not a DTensor"):
        fsdp_layout([nn.Parameter(torch.zeros(2))])
    p = nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="unsharded parameters"):
        shard_jacobian(p.sum(0), [p], ShardLayout((torch.Size([4, 2]),), 0, 1))
    with pytest.raises(ValueError, match="block_numel"):
        shard_jacobian(p.sum(0), [p], block_numel=0)
    with pytest.raises(ValueError, match="elements"):
        shard_term([p], torch.zeros(5), ShardLayout.of([p]))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL)"
)
@pytest.mark.timeout(300)
def test_sharded_steps_on_two_gpus(tmp_path):  # pragma: no cover - GPU machines only
    _assert_reference_steps(spawn_two_ranks(_gpu_worker, tmp_path, backend="nccl"))


def _assert_reference_steps(records: list[dict]) -> list[list[torch.Tensor]]:
    """Each rank's Gramians and parameters equal the one-process reference's (1e-5); returns the reference's
    parameters."""
    grams, params = reference()
    for rec in records:
        for step in range(3):
            torch.testing.assert_close(rec["grams"][step], grams[step], atol=1e-5, rtol=1e-5)
            for got, want in zip(rec["params"][step], params[step], strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return params


def _gpu_worker(rank: int, world: int) -> dict:  # pragma: no cover - GPU machines only
    torch.backends.cuda.matmul.allow_tf32 = False
    return _sharded_steps(rank, world, "cuda")


# ------------------------------------------------------------------------------------------ Lightning (FSDP2)
def _lightning_configs() -> dict:
    """label -> (strategy factory, representation model?, module arguments, sharded-engine calls expected in
    2 epochs of 4 steps: one per micro-batch for a parameter-mode gradient method, none otherwise)."""
    from lightning_mtl.cli.registry import make_strategy
    from lightning_mtl.strategies.imtl import IMTL
    from lightning_mtl.strategies.mgda import MGDA
    from lightning_mtl.strategies.upgrad import UPGrad

    return {
        "DWA": (lambda: make_strategy("DWA"), False, {}, 0),  # loss-based: unchanged
        "UPGrad": (lambda: make_strategy("UPGrad"), False, {}, 8),  # heads plain: J_sᵀ(w − 1) per shard
        "MGDA": (lambda: make_strategy("MGDA"), False, {}, 8),  # heads weighted: Σ wᵢLᵢ only
        "PCGrad": (lambda: make_strategy("PCGrad"), False, {}, 8),  # surgery, from the Gramian
        "IMTL": (lambda: IMTL(), False, {}, 8),  # explicit head weights e^s
        "MGDA-UB": (lambda: MGDA(mode="representation"), True, {}, 0),  # representation mode: unchanged
        "UPGrad-acc2": (lambda: make_strategy("UPGrad"), False, {"accumulate_grad_batches": 2}, 8),
        "MoDo": (lambda: make_strategy("MoDo"), False, {}, 16),  # two parts: one sharded Jacobian each
        "GradNorm": (lambda: make_strategy("GradNorm"), False, {}, 8),  # norms from the Gramian's diagonal
        "UPGrad-every2": (
            lambda: UPGrad(update_every=2),
            False,
            {},
            8,
        ),  # reused weights, J_s per micro-batch
    }


def _fsdp_tiny_net(representation: bool, **kwargs):
    from helpers import RepTinyNet, TinyNet
    from torch.distributed.fsdp import fully_shard

    class FSDPTinyNet(RepTinyNet if representation else TinyNet):
        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            # every module called in task_losses is a unit of its own: FSDP2 gathers a unit's parameters when
            # the unit is called, and Lightning calls training_step, never the root's forward
            for module in (self.encoder, *self.heads.values()):
                fully_shard(module, mesh=mesh, reshard_after_forward=False)
            fully_shard(self, mesh=mesh, reshard_after_forward=False)

    return FSDPTinyNet(optimizer="adam", lr=0.01, **kwargs)


def _lightning_main(out: str, epochs: int, batch: int) -> None:  # one torchrun rank
    from helpers import make_data, trainer
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    import lightning_mtl.gradients.sharded as sharded

    calls = [0]
    engine = sharded.shard_jacobian

    def counted(*args, **kwargs):  # proves that the sharded engine served the gradient methods
        calls[0] += 1
        return engine(*args, **kwargs)

    sharded.shard_jacobian = counted
    ds = make_data(n=64)
    for label, (factory, representation, kwargs, _) in _lightning_configs().items():
        calls[0] = 0
        strategy = factory()
        model = _fsdp_tiny_net(representation, **kwargs)
        t = trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=2,
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            callbacks=[strategy],
        )
        t.fit(model, DataLoader(ds, batch_size=batch))
        params = torch.cat([p.full_tensor().detach().flatten() for p in model.parameters()])
        if t.global_rank == 0:
            torch.save(
                {"params": params, "weights": strategy.weights, "sharded_calls": calls[0]},
                os.path.join(out, f"{label}.pt"),
            )


@pytest.mark.timeout(600)
def test_lightning_model_parallel_strategy_equals_one_process(tmp_path):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) on 2 CPU ranks (gloo, launched by torchrun) x B equals one
    process x 2B after 2 epochs (1e-5): a loss method (DWA), gradient methods through the sharded engine
    (UPGrad and PCGrad: heads plain, the correction through the shards; MGDA: heads weighted; IMTL: explicit
    head weights; UPGrad with accumulate_grad_batches=2 and with update_every=2) and representation mode (MGDA-UB, unchanged)."""
    epochs, batch = 2, 8
    run_torchrun(__file__, tmp_path, epochs, batch)
    configs = _lightning_configs()
    runs = one_process_runs({label: config[:3] for label, config in configs.items()}, epochs, batch)
    for label, (params, strategy_weights) in runs.items():
        saved = torch.load(tmp_path / f"{label}.pt", weights_only=False)
        assert saved["sharded_calls"] == configs[label][3], label
        torch.testing.assert_close(saved["params"], params, atol=1e-5, rtol=0, msg=label)
        for task, w in strategy_weights.items():
            assert saved["weights"][task] == pytest.approx(w, abs=1e-5), label


if __name__ == "__main__":  # torchrun rank of test_lightning_model_parallel_strategy_equals_one_process
    _lightning_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(
        0
    )  # skip the interpreter's teardown: gloo's threads can abort it ("terminate called without ...")
