"""The lightning-mtl command end to end on tiny settings, the strategy registry, and LightningCLI configs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_mtl import MultiTaskModule, callbacks
from lightning_mtl.cli import available_strategies, default_strategies, main, resolve_strategy
from lightning_mtl.datasets import MLPMultiTask, load_dataset, select_tasks
from lightning_mtl.metrics import delta_m
from lightning_mtl.strategies import DWA, EqualWeighting, UncertaintyWeighting

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_strategy_registry():
    assert resolve_strategy("equal") is EqualWeighting
    assert resolve_strategy("Uncertainty_Weighting") is UncertaintyWeighting
    assert resolve_strategy("dwa") is DWA
    with pytest.raises(ValueError, match=r"Unknown strategy 'nope'; available: .*EqualWeighting"):
        resolve_strategy("nope")
    defaults = default_strategies()
    assert defaults[:5] == ["EqualWeighting", "UncertaintyWeighting", "DWA", "RLW", "GLS"]
    assert set(defaults) <= set(available_strategies())
    assert not {"MTLStrategy", "LossWeighting", "GradientWeighting"} & set(available_strategies())


@pytest.mark.timeout(300)
def test_compare_end_to_end_writes_every_promised_file(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--strategies", "equal,uncertainty", "--tasks", "digit,value", "--epochs", "1"]
    assert main([*args, "--out", str(out), "--quiet", "--log-every-n-steps", "5"]) == 0
    for name in ("results.md", "results.csv", "weights.png", "losses.png", "baselines.json"):
        assert (out / name).is_file(), name
    for name in ("weights.png", "losses.png"):
        assert (out / name).read_bytes()[:8] == PNG
    for run in ("EqualWeighting", "UncertaintyWeighting", "single_task/digit", "single_task/value"):
        assert list((out / "tb" / run).glob("events.out.tfevents.*")), run

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["strategy"] for r in rows] == ["EqualWeighting", "UncertaintyWeighting"]
    expected_columns = [
        "digit/acc",
        "value/mae",
        "digit/loss",
        "value/loss",
        "delta_m",
        "ms_per_step",
        "peak_mem_mb",
    ]
    assert all(c in rows[0] for c in expected_columns)
    baselines = json.loads((out / "baselines.json").read_text())
    assert set(baselines) == {"digit/acc", "value/mae"}
    for row in rows:
        values = {k: float(row[k]) for k in baselines}
        assert float(row["delta_m"]) == pytest.approx(
            delta_m(values, baselines, {"digit/acc": True, "value/mae": False}), rel=1e-5
        )
        assert float(row["ms_per_step"]) > 0
    md = (out / "results.md").read_text()
    assert "| strategy | digit/acc ↑ | value/mae ↓ |" in md and "EqualWeighting" in md and "Δm% ↓" in md

    # the TensorBoard run has the per-task series, the weights and Δm%
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tb" / "UncertaintyWeighting")).Reload().Tags()["scalars"]
    assert {"val/digit/acc", "val/delta_m", "train/weight/digit", "train/loss/value"} <= set(tags)

    # a second run can reuse the baselines file
    out2 = tmp_path / "again"
    main(["compare", "--strategies", "dwa", "--tasks", "digit,value", "--epochs", "1", "--out", str(out2),
          "--quiet", "--baselines", str(out / "baselines.json")])  # fmt: skip
    assert not (out2 / "baselines.json").exists()
    assert next(csv.DictReader((out2 / "results.csv").open()))["delta_m"] != ""


def test_compare_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="Unknown strategy 'nope'"):
        main(["compare", "--strategies", "nope", "--out", str(tmp_path), "--quiet"])
    with pytest.raises(SystemExit, match=r"unknown: \['nope'\]"):
        main(["compare", "--tasks", "digit,nope", "--out", str(tmp_path), "--quiet"])
    with pytest.raises(SystemExit, match="--epochs must be >= 1"):
        main(["compare", "--epochs", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="Unknown data set 'mnist'"):
        load_dataset("mnist")


def test_builtin_datasets_and_model():
    for name, tasks in (
        ("digits", ("digit", "parity", "value")),
        ("synthetic", ("low", "high", "noisy", "sign")),
    ):
        data = load_dataset(name)
        assert data.task_names == tasks
        x, y = data.train.tensors
        assert y.shape[1] == len(tasks) and len(data.val) > 0
        assert load_dataset(name) is data  # cached, deterministic
    model = MLPMultiTask("synthetic", ["high", "sign"])
    assert model.task_names == ("high", "sign") and model.columns == [1, 3]
    losses, outputs = model.task_losses(load_dataset("synthetic").train[:8], 0)
    assert set(losses) == set(outputs) == {"high", "sign"}
    assert model.task_metrics.higher_is_better == {"high/mae": False, "sign/acc": True}
    with pytest.raises(TypeError, match="got the string 'digit'"):
        select_tasks(load_dataset("digits"), "digit")


@pytest.mark.timeout(300)
def test_compare_with_a_user_config(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example config names examples.wine_mtl
    out = tmp_path / "wine"
    main(["compare", "--config", "examples/compare_config.yaml", "--strategies", "equal,gls", "--epochs", "1",
          "--out", str(out), "--quiet"])  # fmt: skip
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["strategy"] for r in rows] == ["EqualWeighting", "GLS"]
    assert all(
        r["delta_m"] != "" and r["cultivar/acc"] != "" for r in rows
    )  # baselines from the YAML's DeltaM
    assert (out / "weights.png").is_file() and (out / "tb" / "GLS").is_dir()


@pytest.mark.timeout(300)
def test_fit_subcommand_runs_the_example_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    main(["fit", "--config", "examples/compare_config.yaml", "--trainer.max_epochs=1",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false"])  # fmt: skip
    assert list((tmp_path / "wine").glob("version_*/events.out.tfevents.*"))
    out = capsys.readouterr().out
    assert "lightning-mtl summary (UncertaintyWeighting)" in out and "task affinity" in out


def test_every_strategy_and_callback_is_configurable_from_yaml(tmp_path):
    """LightningCLI builds every strategy and diagnostics callback from class_path + init_args."""
    extra = [
        {"class_path": "lightning_mtl.callbacks.GradientConflictMonitor", "init_args": {"every_n_steps": 7}},
        {"class_path": "lightning_mtl.callbacks.TaskAffinity", "init_args": {"every_n_steps": 3, "lr": 0.1}},
        {"class_path": "lightning_mtl.callbacks.DeltaM", "init_args": {"baselines": {"digit/acc": 0.9}}},
        {"class_path": "lightning_mtl.callbacks.MTLSummary", "init_args": {"print_table": False}},
    ]
    strategies = [
        {"class_path": f"lightning_mtl.strategies.{name}"} for name in sorted(available_strategies())
    ]
    config = {
        "trainer": {"callbacks": strategies + extra, "logger": False},
        "model": {"class_path": "lightning_mtl.datasets.MLPMultiTask", "init_args": {"tasks": ["digit"]}},
        "data": {"class_path": "lightning_mtl.datasets.BuiltinDataModule", "init_args": {"batch_size": 16}},
    }
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(
        MultiTaskModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", str(path)],
        run=False,
        save_config_callback=None,
    )
    built = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    for name, cls in available_strategies().items():
        assert isinstance(built[name], cls), name
    assert built["GradientConflictMonitor"].every_n_steps == 7
    assert built["TaskAffinity"].lr == 0.1 and built["TaskAffinity"].every_n_steps == 3
    assert built["DeltaM"].baselines == {"digit/acc": 0.9}
    assert isinstance(built["MTLSummary"], callbacks.MTLSummary) and not built["MTLSummary"].print_table
    assert cli.model.task_names == ("digit",)


def test_console_script_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "lightning_mtl.cli", "compare", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for option in ("--strategies", "--tasks", "--epochs", "--devices", "--seed", "--out", "--config"):
        assert option in result.stdout
    config = yaml.safe_load((ROOT / "examples" / "compare_config.yaml").read_text())
    assert config["model"]["class_path"] == "examples.wine_mtl.WineNet"
