"""One "node" of the multi-node test (tests/test_multinode.py), launched by ``torchrun --nnodes=2``: trains the
test model with each strategy named on the command line under Lightning's ``num_nodes=2`` and saves the final
parameters and weights of global rank 0."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import TinyNet, flat_params, make_data, trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_mtl.cli.registry import make_strategy  # noqa: E402


def main() -> None:
    out, epochs, batch_size, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
    ds = make_data(n=64)
    for name in names:
        strategy = make_strategy(name)
        model = TinyNet(optimizer="adam", lr=0.01)
        t = trainer(
            max_epochs=epochs, strategy="ddp", accelerator="cpu", devices=1, num_nodes=2, callbacks=[strategy]
        )
        t.fit(model, DataLoader(ds, batch_size=batch_size))
        if t.global_rank == 0:
            torch.save(
                {"params": flat_params(model), "weights": strategy.weights, "node_rank": t.node_rank},
                os.path.join(out, f"{name}.pt"),
            )


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(
        0
    )  # skip the interpreter's teardown: gloo's threads can abort it ("terminate called without ...")
