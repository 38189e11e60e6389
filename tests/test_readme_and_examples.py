"""The README's quick start and the examples run as written."""

from __future__ import annotations

import pathlib
import re
import runpy
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    weights = namespace["trainer"].callbacks[0].weights
    assert set(weights) == {"depth", "seg"}
    assert (tmp_path / "runs").exists()


def test_quickstart_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        sys, "argv", ["quickstart.py", "--epochs", "1", "--strategy", "DWA", "--out", str(tmp_path)]
    )
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    assert "final task weights (DWA)" in capsys.readouterr().out
    assert list(tmp_path.glob("DWA/version_0/events.out.tfevents.*"))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
