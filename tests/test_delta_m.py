"""Δm% (Maninis et al. 2019) on hand-computed numbers, and the DeltaM callback."""

from __future__ import annotations

import pytest
from helpers import loader, make_data, trainer
from test_metrics import MetricNet

from lightning_mtl.callbacks import DeltaM
from lightning_mtl.metrics import delta_m

VALUES = {"seg/miou": 0.55, "seg/acc": 0.80, "depth/abs_err": 0.40, "extra/ignored": 3.0}
BASE = {"seg/miou": 0.50, "seg/acc": 0.80, "depth/abs_err": 0.50}
HIGHER = {"seg/miou": True, "seg/acc": True, "depth/abs_err": False}


def test_delta_m_hand_computed():
    # miou: -(0.55-0.50)/0.50 = -0.10; acc: 0; abs_err: +(0.40-0.50)/0.50 = -0.20 -> flat mean -0.10 -> -10 %
    # (averaging per task first would give (-0.05 + -0.20)/2 = -12.5 %: the flat mean is the convention)
    assert delta_m(VALUES, BASE, HIGHER) == pytest.approx(-10.0)


def test_delta_m_sign_convention_lower_is_better():
    worse = {"seg/miou": 0.45, "seg/acc": 0.80, "depth/abs_err": 0.60}
    # miou: +0.10, acc 0, abs_err: +0.20 -> +10 %: a performance drop is positive
    assert delta_m(worse, BASE, HIGHER) == pytest.approx(10.0)
    assert delta_m(BASE, BASE, HIGHER) == 0.0
    assert delta_m({"t/m": 2.0}, {"t/m": 4.0}, {"t/m": False}) == pytest.approx(-50.0)
    assert delta_m({"t/m": 2.0}, {"t/m": 4.0}, {"t/m": True}) == pytest.approx(50.0)


def test_delta_m_errors():
    with pytest.raises(ValueError, match="at least one baseline"):
        delta_m(VALUES, {}, HIGHER)
    with pytest.raises(KeyError, match="no value for baseline metric 'x/y'"):
        delta_m(VALUES, {"x/y": 1.0}, {"x/y": True})
    with pytest.raises(KeyError, match="direction of 'seg/miou' unknown"):
        delta_m(VALUES, {"seg/miou": 0.5}, {})
    with pytest.raises(ValueError, match="baseline of 'seg/miou' is 0.0"):
        delta_m(VALUES, {"seg/miou": 0.0}, HIGHER)


def test_callback_logs_delta_m_from_the_epoch_metrics():
    baselines = {"a/mae": 0.8, "b/mse": 2.0, "b/mae": 1.1, "c/loss": 3.0}
    cb = DeltaM(baselines)
    t = trainer(max_epochs=2, callbacks=[cb])
    t.fit(MetricNet(), loader(make_data(n=32)), loader(make_data(n=32, seed=1)))
    logged = {k: float(v) for k, v in t.callback_metrics.items()}
    values = {"a/mae": logged["val/a/mae"], "b/mse": logged["val/b/mse"], "b/mae": logged["val/b/mae"]}
    values["c/loss"] = logged["val/loss/c"]
    directions = {"a/mae": False, "b/mse": False, "b/mae": False, "c/loss": False}
    expected = delta_m(values, baselines, directions)
    assert logged["val/delta_m"] == pytest.approx(expected, rel=1e-5)
    assert cb.last["val"] == pytest.approx(expected, rel=1e-5)
    [result] = t.test(t.lightning_module, loader(make_data(n=32, seed=1)), verbose=False)
    assert result["test/delta_m"] == pytest.approx(expected, rel=1e-5)  # same data, same model


def test_callback_direction_override():
    cb = DeltaM({"a/mae": 0.8}, higher_is_better={"a/mae": True})
    t = trainer(callbacks=[cb])
    t.fit(MetricNet(), loader(make_data(n=16)), loader(make_data(n=16)))
    mae = float(t.callback_metrics["val/a/mae"])
    assert float(t.callback_metrics["val/delta_m"]) == pytest.approx(-100 * (mae - 0.8) / 0.8, rel=1e-5)


def test_callback_validation():
    with pytest.raises(ValueError, match="non-empty dict"):
        DeltaM({})
    with pytest.raises(ValueError, match="must look like '<task>/<metric>'"):
        DeltaM({"mae": 1.0})
    with pytest.raises(ValueError, match="non-zero number"):
        DeltaM({"a/mae": 0.0})
    with pytest.raises(KeyError, match="have no baseline"):
        DeltaM({"a/mae": 1.0}, higher_is_better={"b/mae": True})
    data = loader(make_data(n=16))
    with pytest.raises(KeyError, match=r"unknown task 'z'; tasks: \['a', 'b', 'c'\]"):
        trainer(callbacks=[DeltaM({"z/mae": 1.0})]).fit(MetricNet(), data, data)
    with pytest.raises(
        KeyError, match=r"task 'a' has no metric of that name; available: \['a/loss', 'a/mae'\]"
    ):
        trainer(callbacks=[DeltaM({"a/acc": 1.0})]).fit(MetricNet(), data, data)
