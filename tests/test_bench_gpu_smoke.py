"""Smoke test of ``benchmarks/bench_gpu.py``: its CPU quick mode runs end to end, and without CUDA the default
(GPU) mode exits 0 with a message."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _bench_gpu():
    sys.path.insert(0, BENCHMARKS)
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(BENCHMARKS, "bench_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_quick_cpu_mode_runs(tmp_path) -> None:
    output = tmp_path / "bench_gpu.md"
    assert _bench_gpu().main(["--device", "cpu", "--quick", "--output", str(output)]) == 0
    text = output.read_text()
    assert "ResNet-18 trunk (width 8" in text
    assert "#### Lightning path: T = 2, fp32" in text
    assert "#### Plain torch loop, ours vs TorchJD: T = 2, fp32" in text
    for name in ("EqualWeighting", "UPGrad", "GradDrop"):
        assert f"| {name} |" in text
    assert "| error |" not in text


def test_resnet18_trunk_shapes() -> None:
    trunk, features = _bench_gpu().resnet18_trunk(64)
    assert features == 512
    assert sum(p.numel() for p in trunk.parameters()) == 11_176_512  # ResNet-18 without its classifier
    assert trunk(torch.zeros(2, 3, 64, 64)).shape == (2, 512)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_skips_cleanly_without_cuda(capsys) -> None:
    assert _bench_gpu().main([]) == 0
    assert "no CUDA device available" in capsys.readouterr().out
