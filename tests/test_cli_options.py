"""lightning-mtl compare's options: bad --baselines files, a non-empty --out, the config's settings against the
flags, and sys.path."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_mtl.cli import build_parser, main
from lightning_mtl.cli.compare import load_baselines, prepare_out
from lightning_mtl.cli.setups import config_setup, resolve_settings

ROOT = Path(__file__).resolve().parents[1]


def _compare_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["compare", *argv])


# ------------------------------------------------------------------------------------------ --baselines
def test_missing_baselines_file_is_a_one_line_error_naming_it(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(
        SystemExit, match=rf"--baselines {missing} does not exist; expected 'train', 'none' or"
    ):
        main(["compare", "--baselines", str(missing), "--out", str(tmp_path / "out"), "--quiet"])
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("content", "match"),
    [("{not json", "is not readable JSON"), ('["digit/acc", 0.9]', "not an object of numbers"),
     ('{"digit/acc": "high"}', "not an object of numbers")],
)  # fmt: skip
def test_malformed_baselines_file_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "base.json"
    path.write_text(content)
    with pytest.raises(
        ValueError,
        match=rf"--baselines {re.escape(str(path))} .*{match}.*expected 'train', 'none' or a JSON file",
    ):
        load_baselines(str(path))
    assert load_baselines(_write(tmp_path / "ok.json", '{"digit/acc": 0.9, "value/mae": 1}')) == {
        "digit/acc": 0.9,
        "value/mae": 1.0,
    }


def test_bad_baselines_file_exits_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_mtl.cli", "compare", "--baselines", "missing.json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "lightning-mtl compare: --baselines missing.json does not exist; expected 'train', 'none' or a JSON "
        'file {"<task>/<metric>": value, ...} such as the baselines.json that lightning-mtl compare '
        "--baselines train writes."
    )


# ------------------------------------------------------------------------------------------ --out
def test_a_non_empty_out_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "cmp"
    (out / "tb" / "old_run").mkdir(parents=True)
    (out / "results.md").write_text("old")
    with pytest.raises(SystemExit, match=rf"--out {out} is not empty .*Pass --overwrite to empty it first"):
        main(["compare", "--strategies", "equal", "--out", str(out), "--quiet"])
    assert (out / "results.md").read_text() == "old" and (out / "tb" / "old_run").is_dir()


def test_overwrite_empties_only_the_named_directory(tmp_path, monkeypatch):
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "precious.txt").write_text("x")
    out = tmp_path / "cmp"
    (out / "tb" / "old_run").mkdir(parents=True)
    (out / "results.md").write_text("old")
    (out / "link").symlink_to(outside, target_is_directory=True)
    prepare_out(out, overwrite=True)
    assert out.is_dir() and not any(out.iterdir())
    assert (outside / "precious.txt").read_text() == "x"  # a link inside --out is removed, not followed

    prepare_out(tmp_path / "new" / "dir", overwrite=False)  # created, parents included
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        prepare_out(tmp_path / "file", overwrite=True)

    monkeypatch.chdir(out)
    (out / "mine.py").write_text("")
    for named in (".", "..", str(tmp_path)):
        with pytest.raises(ValueError, match="the working directory, one of its parents or the home"):
            prepare_out(Path(named), overwrite=True)
    assert (out / "mine.py").exists() and (outside / "precious.txt").exists()


# ------------------------------------------------------------------------------------------ sys.path
def test_main_appends_the_working_directory_to_sys_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    first = sys.path[0]
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--help"])
    assert exc.value.code == 0
    assert sys.path[0] == first and sys.path[-1] == str(tmp_path)
    assert sys.path.count(str(tmp_path)) == 1
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert sys.path.count(str(tmp_path)) == 1  # only if absent


# ------------------------------------------------------------------------------------------ --config
def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _wine_config(tmp_path: Path, **trainer) -> str:
    config = yaml.safe_load((ROOT / "examples" / "compare_config.yaml").read_text())
    config["trainer"].update(trainer)
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning_mtl.strategies.DWA", "init_args": {"temperature": 3.0}},
        {"class_path": "lightning_mtl.callbacks.GradientConflictMonitor", "init_args": {"every_n_steps": 2}},
        {"class_path": "lightning_mtl.callbacks.DeltaM", "init_args": {"baselines": {"cultivar/acc": 0.9}}},
    ]
    return _write(tmp_path / "wine.yaml", yaml.safe_dump(config))


def test_flags_override_the_config_only_when_given_and_say_so():
    configured = {"trainer.max_epochs": 10, "trainer.accelerator": "cpu", "seed_everything": 7}
    settings = resolve_settings(_compare_args(), configured)
    assert (settings.epochs, settings.accelerator, settings.seed) == (10, "cpu", 7)
    assert (settings.devices, settings.log_every_n_steps) == (1, 10) and settings.notes == []
    settings = resolve_settings(_compare_args("--epochs", "3", "--seed", "7", "--devices", "1"), configured)
    assert (settings.epochs, settings.seed) == (3, 7)
    assert settings.notes == ["--epochs 3 overrides the config's trainer.max_epochs=10"]  # same seed: no note
    defaults = resolve_settings(_compare_args(), {})
    assert (defaults.epochs, defaults.devices, defaults.accelerator, defaults.seed) == (5, 1, "auto", 0)


def test_the_config_strategy_and_callbacks_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names examples.wine_mtl
    setup = config_setup(_compare_args("--config", _wine_config(tmp_path, max_epochs=2)))
    assert setup.strategy == "DWA" and setup.baselines == {"cultivar/acc": 0.9}
    assert setup.configured == {"trainer.max_epochs": 2, "trainer.accelerator": "cpu",
                                "trainer.devices": 1, "trainer.log_every_n_steps": 5, "seed_everything": 0}  # fmt: skip
    assert setup.trainer_kwargs["enable_checkpointing"] is False and "logger" not in setup.trainer_kwargs
    run = setup.build(None, 0)
    assert type(run.strategy).__name__ == "DWA" and run.strategy.temperature == 3.0
    assert [type(cb).__name__ for cb in run.callbacks] == ["GradientConflictMonitor"]
    assert run.callbacks[0].every_n_steps == 2
    assert setup.build(None, 0).strategy is not run.strategy  # fresh objects for every run
    with pytest.raises(ValueError, match="--tasks, --batch-size applies to the built-in data sets"):
        config_setup(_compare_args("--config", "x.yaml", "--tasks", "a", "--batch-size", "8"))


@pytest.mark.timeout(300)
def test_compare_with_a_config_honours_its_epochs_strategy_and_callbacks(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    config = _wine_config(tmp_path, max_epochs=2)
    out = tmp_path / "cmp"
    assert main(["compare", "--config", config, "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["strategy"] for r in rows] == ["DWA"]  # the configured strategy, not the default list
    from examples.wine_mtl import WineDataModule

    data = WineDataModule(batch_size=32)
    data.setup("fit")
    steps = json.loads((out / ".records" / "DWA.json").read_text())["loss_steps"]
    assert len(steps) == 2 * len(data.train_dataloader())  # the config's max_epochs, not --epochs' default

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tb" / "DWA")).Reload().Tags()["scalars"]
    assert "grad/conflict_fraction" in tags  # the config's GradientConflictMonitor ran
    assert "val/delta_m" in tags and "note:" not in capsys.readouterr().out

    # flags win, and say what they replace; a second run into the same --out needs --overwrite
    with pytest.raises(SystemExit, match="is not empty"):
        main(["compare", "--config", config, "--out", str(out), "--quiet", "--epochs", "1"])
    main(["compare", "--config", config, "--out", str(out), "--quiet", "--epochs", "1", "--strategies", "equal",
          "--overwrite"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "--epochs 1 overrides the config's trainer.max_epochs=2" in printed
    assert "--strategies replaces the config's strategy callback DWA" in printed
    assert [r["strategy"] for r in csv.DictReader((out / "results.csv").open())] == ["EqualWeighting"]
    assert sorted(p.name for p in (out / "tb").iterdir()) == ["EqualWeighting"]  # the old DWA run is gone
    steps = json.loads((out / ".records" / "EqualWeighting.json").read_text())["loss_steps"]
    assert len(steps) == len(data.train_dataloader())


def test_quiet_lightning_restores_the_logging_and_warning_filters():
    # run_compare silences Lightning while it runs; a program that calls it keeps its own logging afterwards
    import logging
    import warnings

    from lightning_mtl.cli.compare import quiet_lightning

    logger = logging.getLogger("lightning.pytorch")
    saved = logger.level
    logger.setLevel(logging.INFO)
    filters = list(warnings.filters)
    try:
        with quiet_lightning():
            assert logger.level == logging.ERROR
            assert len(warnings.filters) > len(filters)
        assert logger.level == logging.INFO
        assert warnings.filters == filters
    finally:
        logger.setLevel(saved)
