"""Shard-wise per-task gradients of an FSDP1 (``FullyShardedDataParallel``) model against the unsharded computation.

Two gloo processes, each with half of a global batch of 8, wrap a tiny MLP (a trunk of two layers, the shared
parameters, and three one-row heads) with FSDP1 (``SHARD_GRAD_OP``, on the CPU) in three layouts: the trunk a unit
of its own and the heads in the root's flat parameter; one unit for everything (the shared elements are a masked
part of one flat parameter, with alignment padding); and ``use_orig_params=False`` with the trunk's flat parameter
named as the shared parameter. On every step the Gramian built shard by shard equals the unsharded Gramian of the
global batch, and three steps — UPGrad with plain heads (the correction in the one backward,
:meth:`FlatShards.term`), MGDA with weighted heads (``Σ wᵢLᵢ`` only), PCGrad with plain heads and the per-task
gradients by blocks — give the parameters of the same steps taken by one process on the whole batch, within 1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TinyNet
from shard_helpers import (
    HEADS,
    LR,
    Net,
    error_of,
    losses,
    model_class,
    module_and_batch,
    one_process_runs,
    rank_batch,
    reference,
    run_torchrun,
    spawn_two_ranks,
    weights,
)
from torch import nn

from lightning_mtl import MultiTaskModule
from lightning_mtl.fsdp1 import fsdp1_units
from lightning_mtl.gradients.flat_sharded import FlatShards
from lightning_mtl.gradients.jacobian import JacobianEngine
from lightning_mtl.gradients.sharded import shard_combination, sharded_gramian

LAYOUTS = ("trunk_unit", "one_unit", "flat_params")


def _wrap(layout: str, strategy: str = "SHARD_GRAD_OP"):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    net = Net()
    kwargs = dict(
        device_id=torch.device("cpu"),
        sharding_strategy=getattr(ShardingStrategy, strategy),
        use_orig_params=layout != "flat_params",
    )
    if layout != "one_unit":
        net.trunk = FSDP(net.trunk, **kwargs)
    root = FSDP(net, **kwargs)
    if layout == "flat_params":
        shared = list(net.trunk.parameters())  # the trunk unit's FlatParameter
        assert len(shared) == 1
    else:
        shared = list(net.trunk.parameters())  # the original parameters
    return net, root, shared


def _full_params(net: Net) -> torch.Tensor:
    """The unsharded parameters in ``Net``'s order (inside ``summon_full_params``; FSDP1 wraps modules)."""
    trunk = getattr(net.trunk, "module", net.trunk)
    tensors = [trunk[0].weight, trunk[0].bias, trunk[2].weight, trunk[2].bias]
    tensors += [t for h in net.heads for t in (h.weight, h.bias)]
    return torch.cat([t.detach().flatten().clone() for t in tensors])


def _worker(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    x, y = rank_batch(rank, world)
    record: dict = {}
    engine = JacobianEngine("auto", owner="test")
    for layout in LAYOUTS:
        net, root, shared = _wrap(layout)
        opt = torch.optim.SGD(root.parameters(), lr=LR)
        grams, params, local = [], [], []
        for step in range(3):
            L = losses(root, x, y)
            shards = FlatShards.of(fsdp1_units(root), shared, "test")
            J_s = shards.jacobian(L, engine, None, block_numel=8 if step == 2 else None)
            local.append((J_s.shape[1], shards.numel))
            G = sharded_gramian(J_s)
            w = weights(step, G).to(L)
            opt.zero_grad()
            if HEADS[step] == "weighted":
                (w * L).sum().backward()
            else:
                (L.sum() + shards.term(shard_combination(J_s, w - 1))).backward()
            opt.step()
            grams.append(G)
            with FSDP.summon_full_params(root):
                params.append(_full_params(net))
        record[layout] = {"grams": grams, "params": params, "local": local}
    # FULL_SHARD frees the parameters after the forward: a clear error, not wrong numbers
    net, root, shared = _wrap("trunk_unit", "FULL_SHARD")
    losses(root, x, y)
    record["error"] = error_of(lambda: FlatShards.of(fsdp1_units(root), shared, "UPGrad"), RuntimeError)
    net, root, shared = _wrap("trunk_unit")
    losses(root, x, y)
    foreign = [nn.Parameter(torch.zeros(2))]
    record["foreign"] = error_of(lambda: FlatShards.of(fsdp1_units(root), foreign, "UPGrad"), ValueError)
    return record


@pytest.mark.timeout(300)
def test_fsdp1_sharded_gramian_and_steps_equal_unsharded(tmp_path):
    records = spawn_two_ranks(_worker, tmp_path)
    grams, steps = reference()
    params = [torch.cat([p.flatten() for p in step]) for step in steps]
    for rec in records:
        for layout in LAYOUTS:
            for step in range(3):
                torch.testing.assert_close(rec[layout]["grams"][step], grams[step], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(rec[layout]["params"][step], params[step], atol=1e-5, rtol=1e-5)
            # each rank holds ⌈N/2⌉ or fewer columns of the units' N elements, never the whole J
            for local, numel in rec[layout]["local"]:
                assert local <= (numel + 1) // 2 < numel, layout
        assert "sharding_strategy FULL_SHARD" in rec["error"] and "SHARD_GRAD_OP" in rec["error"]
        assert "belongs to no FSDP1 unit" in rec["foreign"]
    assert not torch.allclose(
        params[0], torch.cat([p.detach().flatten() for p in Net().parameters()])
    )  # moved


# ------------------------------------------------------------------------------------------ Lightning (FSDP1)
class AutoTinyNet(TinyNet):
    """:class:`TinyNet` without its ``shared_parameters()``: found from the graph, through FSDP1's flat parameters."""

    shared_parameters = MultiTaskModule.shared_parameters


def _lightning_configs() -> dict:
    """label -> (strategy factory, model (``shard_helpers.model_class``), module arguments, FSDP units, engine calls
    expected in 2 epochs of 4 steps: one per micro-batch for a parameter-mode gradient method, none otherwise).
    Units ``"linear"``: every ``nn.Linear`` a unit of its own (the root holds no parameter); ``"encoder"``: the
    encoder one unit, the heads in the root's flat parameter."""
    from lightning_mtl.cli.registry import make_strategy
    from lightning_mtl.strategies.imtl import IMTL
    from lightning_mtl.strategies.mgda import MGDA
    from lightning_mtl.strategies.modo import MoDo
    from lightning_mtl.strategies.sdmgrad import SDMGrad
    from lightning_mtl.strategies.upgrad import UPGrad

    return {
        "EqualWeighting": (lambda: make_strategy("EqualWeighting"), False, {}, "linear", 0),
        "DWA-root": (
            lambda: make_strategy("DWA"),
            False,
            {},
            "encoder",
            0,
        ),  # loss-based: FSDP's own backward
        "UPGrad": (
            lambda: make_strategy("UPGrad"),
            False,
            {},
            "linear",
            8,
        ),  # heads plain: J_sᵀ(w − 1) per shard
        "UPGrad-root": (lambda: make_strategy("UPGrad"), False, {}, "encoder", 8),
        "MGDA": (lambda: make_strategy("MGDA"), False, {}, "linear", 8),  # heads weighted: Σ wᵢLᵢ only
        "PCGrad-root": (
            lambda: make_strategy("PCGrad"),
            False,
            {},
            "encoder",
            8,
        ),  # surgery, from the Gramian
        "IMTL": (lambda: IMTL(), False, {}, "linear", 8),  # explicit head weights e^s
        "MGDA-UB": (lambda: MGDA(mode="representation"), True, {}, "linear", 0),  # representation mode
        "UPGrad-acc2": (lambda: make_strategy("UPGrad"), False, {"accumulate_grad_batches": 2}, "linear", 8),
        "UPGrad-every2": (lambda: UPGrad(update_every=2), False, {}, "encoder", 8),  # J_s per micro-batch
        "FAMO": (lambda: make_strategy("FAMO"), False, {}, "linear", 0),  # the post-step forward
        "GradNorm": (lambda: make_strategy("GradNorm"), False, {}, "encoder", 8),
        "UPGrad-found": (lambda: make_strategy("UPGrad"), AutoTinyNet, {}, "encoder", 8),  # shared found
        # independent samples from disjoint parts of each rank's batch: one engine call per part
        "MoDo": (lambda: make_strategy("MoDo"), False, {}, "linear", 16),
        "MoDo-3": (lambda: MoDo(samples=3), False, {"batch_size": 6}, "encoder", 30),
        # lr=1 as in SDMGrad's DDP test: on this data, with the default lr=10, the inner projected SGD turns a
        # 1e-7 relative change of J₀J₁ᵀ (the rounding of its sum over the shards) into parameters ~1e-2 apart
        # (measured in one process by perturbing J₀J₁ᵀ); with lr=1 the same perturbation moves them 6e-8
        "SDMGrad": (lambda: SDMGrad(lr=1.0), False, {"batch_size": 6}, "linear", 30),
    }


def _fsdp_strategy(units: str, device: str = "cpu"):
    """Lightning's ``FSDPStrategy`` (``SHARD_GRAD_OP``); on the CPU: Lightning wraps with
    ``device_id=root_device.index``, ``None`` on the CPU, which FSDP1 refuses without an accelerator; the wrap
    here is Lightning's with ``device_id=cpu``. Only the accelerator differs from a GPU run."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    policy = {nn.Linear} if units == "linear" else {nn.Sequential}
    if device == "cuda":
        return FSDPStrategy(sharding_strategy="SHARD_GRAD_OP", auto_wrap_policy=policy)

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model: nn.Module) -> nn.Module:
            return FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )

    return CPUFSDPStrategy(sharding_strategy="SHARD_GRAD_OP", auto_wrap_policy=policy)


def _lightning_main(out: str, epochs: int, batch: int, device: str) -> None:  # one torchrun rank
    from helpers import make_data, trainer
    from torch.utils.data import DataLoader

    import lightning_mtl.gradients.flat_sharded as flat_sharded

    calls = [0]
    engine = flat_sharded.FlatShards.jacobian

    def counted(self, *args, **kwargs):  # proves that the FSDP1 engine served the gradient methods
        calls[0] += 1
        return engine(self, *args, **kwargs)

    flat_sharded.FlatShards.jacobian = counted
    ds = make_data(n=64)
    for label, (factory, model_kind, kwargs, units, _) in _lightning_configs().items():
        calls[0] = 0
        strategy = factory()
        module_kwargs, rank_batch_size = module_and_batch(kwargs, batch)
        model = model_class(model_kind)(optimizer="adam", lr=0.01, **module_kwargs)
        t = trainer(
            max_epochs=epochs,
            accelerator=device,
            devices=2,
            strategy=_fsdp_strategy(units, device),
            callbacks=[strategy],
        )
        t.fit(model, DataLoader(ds, batch_size=rank_batch_size, drop_last=True))
        # each parameter's local part: a contiguous slice of its flattened elements, rank 0's first
        local = [p.detach().flatten().cpu() for p in model.parameters()]
        torch.save(
            {"local": local, "weights": strategy.weights, "sharded_calls": calls[0]},
            os.path.join(out, f"{label}.rank{t.global_rank}.pt"),
        )
    # a method that needs the Jacobian itself: a clear error on a sharded model, not wrong numbers
    from lightning_mtl.cli.registry import make_strategy

    strategy = _fsdp_strategy("linear", device)
    t = trainer(
        max_epochs=1, accelerator=device, devices=2, strategy=strategy, callbacks=[make_strategy("MoCo")]
    )
    try:
        t.fit(TinyNet(), DataLoader(ds, batch_size=batch))
        error = ""
    except RuntimeError as err:
        error = str(err)
    torch.save(error, os.path.join(out, f"MoCo.rank{t.global_rank}.pt"))


@pytest.mark.timeout(600)
def test_lightning_fsdp_strategy_equals_one_process(tmp_path):
    """Lightning's ``FSDPStrategy`` (FSDP1, ``SHARD_GRAD_OP``) on 2 CPU ranks (gloo, launched by torchrun) x B
    equals one process x 2B after 2 epochs (1e-5): loss methods (FSDP's backward inside the root's forward),
    gradient methods through the flat-shard engine (UPGrad, PCGrad: heads plain; MGDA: heads weighted; IMTL:
    explicit head weights; UPGrad with accumulate_grad_batches=2 and with update_every=2), representation mode
    (MGDA-UB), with every Linear a unit or with the heads in the root's flat parameter."""
    _compare_with_one_process(tmp_path, "cpu", atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.timeout(600)
def test_lightning_fsdp_strategy_on_two_gpus(tmp_path):  # pragma: no cover - GPU machines only
    """The same on two GPUs (NCCL), with Lightning's ``FSDPStrategy`` as it is (no CPU wrap)."""
    _compare_with_one_process(tmp_path, "cuda", atol=1e-4)


def _compare_with_one_process(tmp_path, device: str, atol: float) -> None:
    epochs, batch = 2, 8
    run_torchrun(__file__, tmp_path, epochs, batch, device)
    configs = _lightning_configs()
    runs = one_process_runs({label: config[:3] for label, config in configs.items()}, epochs, batch)
    for label, (params, strategy_weights) in runs.items():
        ranks = [torch.load(tmp_path / f"{label}.rank{r}.pt", weights_only=False) for r in range(2)]
        assert ranks[0]["sharded_calls"] == configs[label][4], label
        # each parameter's local part: a contiguous slice of its flattened elements, rank 0's first
        got = torch.cat(
            [torch.cat([a, b]) for a, b in zip(ranks[0]["local"], ranks[1]["local"], strict=True)]
        )
        torch.testing.assert_close(got, params, atol=atol, rtol=0, msg=label)
        for task, w in strategy_weights.items():
            assert ranks[0]["weights"][task] == pytest.approx(w, abs=atol), label
    for rank in range(2):
        assert "MoCo: the model is sharded (FSDP)" in torch.load(tmp_path / f"MoCo.rank{rank}.pt"), rank


def test_fsdp1_needs_exact_sync_and_no_batch_parts():
    """A model wrapped by FSDP1 with sync='local' is a clear error (each rank holds only its shard). FSDP1 cannot
    be built on the CPU without a process group, so the wrapper is an uninitialised instance (found by type)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lightning_mtl.gradients import TaskGradients

    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(wrapper)
    holder = torch.nn.Module()
    holder.body = wrapper

    class Ctx:
        module = holder
        part_losses = None

    with pytest.raises(RuntimeError, match=r"UPGrad: a sharded \(FSDP\) model needs sync='exact'"):
        TaskGradients("UPGrad", sync="local")._shards_of(Ctx())
    assert TaskGradients("GradDrop", target="representation")._shards_of(Ctx()) is None


if __name__ == "__main__":  # torchrun rank of test_lightning_fsdp_strategy_equals_one_process
    import sys

    _lightning_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the interpreter's teardown: gloo's threads can abort it
