"""MTLSummary: the end-of-fit table of tasks (weights, last losses, metrics, Δm%)."""

from __future__ import annotations

import pytest
from helpers import loader, make_data, trainer
from test_metrics import MetricNet

from lightning_mtl.callbacks import DeltaM, MTLSummary
from lightning_mtl.strategies import StaticWeighting


def test_summary_rows_and_printed_table(capsys):
    summary = MTLSummary()
    cbs = [StaticWeighting({"a": 0.5, "b": 2.0, "c": 1.0}), DeltaM({"a/mae": 1.0, "c/loss": 2.0}), summary]
    t = trainer(max_epochs=2, callbacks=cbs, log_every_n_steps=1)
    t.fit(MetricNet(), loader(make_data(n=32)), loader(make_data(n=32, seed=1)))
    logged = {k: float(v) for k, v in t.callback_metrics.items()}
    assert [r["task"] for r in summary.rows] == ["a", "b", "c"]
    a, b, c = summary.rows
    assert (a["weight"], b["weight"], c["weight"]) == (0.5, 2.0, 1.0)
    assert a["train_loss"] == pytest.approx(logged["train/loss/a"])
    assert c["val_loss"] == pytest.approx(logged["val/loss/c"])
    assert a["metrics"] == {"mae": pytest.approx(logged["val/a/mae"])}
    assert set(b["metrics"]) == {"mse", "mae"} and c["metrics"] == {}
    assert summary.delta_m == pytest.approx(logged["val/delta_m"])
    assert summary.strategy_name == "StaticWeighting"
    out = capsys.readouterr().out
    assert "lightning-mtl summary (StaticWeighting)" in out and "Δm%" in out
    md = summary.to_markdown()
    assert md.splitlines()[0] == "| task | weight | train loss | val loss | val metrics |"
    assert f"mae={logged['val/a/mae']:.4g}" in md and f"{summary.delta_m:+.2f}" in md


def test_summary_without_validation_or_delta_m(capsys):
    summary = MTLSummary(print_table=False)
    trainer(callbacks=[summary], log_every_n_steps=1).fit(MetricNet(), loader(make_data(n=32)))
    assert summary.delta_m is None
    assert all(r["val_loss"] is None and r["metrics"] == {} for r in summary.rows)
    assert all(r["weight"] == 1.0 for r in summary.rows)  # the default equal weighting
    assert capsys.readouterr().out == ""
    assert "| a | 1 |" in summary.to_markdown() and "Δm%" not in summary.to_markdown()
