"""Bad input: every error names the task / argument, the value and the fix."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import ScalarNet, TinyNet, dummy_loader, loader, make_data, trainer

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.strategies import DWA, GLS, RLW, EqualWeighting, StaticWeighting, UncertaintyWeighting


class Returning(ScalarNet):
    """Returns whatever ``make(self)`` builds from the regular losses."""

    def __init__(self, make, **kwargs):
        super().__init__(**kwargs)
        self.make = make

    def task_losses(self, batch, batch_idx):
        return self.make(super().task_losses(batch, batch_idx))


def fit(net, steps=2, callbacks=()):
    trainer(max_steps=steps, callbacks=list(callbacks)).fit(net, dummy_loader(steps))


def test_unknown_task():
    with pytest.raises(KeyError, match=r"unknown task\(s\) \['t9'\].*tasks are \['t0', 't1'\]"):
        fit(Returning(lambda d: {**d, "t9": d["t0"]}))


def test_missing_task():
    with pytest.raises(KeyError, match=r"missing task\(s\) \['t1'\]"):
        fit(Returning(lambda d: {"t0": d["t0"]}))


def test_not_a_mapping():
    with pytest.raises(TypeError, match="mapping task name -> scalar loss"):
        fit(Returning(lambda d: list(d.values())))


def test_non_scalar_loss():
    with pytest.raises(ValueError, match=r"task 't1': loss must be a scalar.*shape \(3,\).*loss.mean\(\)"):
        fit(Returning(lambda d: {"t0": d["t0"], "t1": d["t1"].expand(3)}))


def test_python_float_loss():
    with pytest.raises(TypeError, match=r"task 't0': loss must be a torch.Tensor, got float"):
        fit(Returning(lambda d: {"t0": float(d["t0"]), "t1": d["t1"]}))


def test_detached_loss():
    with pytest.raises(ValueError, match=r"task 't0': the loss does not require grad"):
        fit(Returning(lambda d: {"t0": d["t0"].detach(), "t1": d["t1"]}))


def test_nan_loss_raises_naming_task_and_value():
    with pytest.raises(FloatingPointError, match=r"task 't1' loss is nan.*nonfinite='skip'"):
        fit(Returning(lambda d: {"t0": d["t0"], "t1": d["t1"] * float("nan")}))


def test_inf_loss_skip_policy_skips_the_step_and_warns():
    calls = {"n": 0}

    def make(d):
        calls["n"] += 1
        if calls["n"] == 2:  # second step only
            return {"t0": d["t0"], "t1": d["t1"] * float("inf")}
        return d

    net = Returning(make, nonfinite="skip")
    with pytest.warns(UserWarning, match=r"task 't1' loss is inf.*skipping this optimizer step"):
        fit(net, steps=3)
    assert net.skipped_steps == 1
    # two real SGD steps from θ=1 with equal weighting: 1 -> 1.6 -> 1.6 - 0.1*(2*1.6 + 4*(1.6-3)) = 1.84
    assert net.theta.item() == pytest.approx(1.84)


def test_two_strategies_attached():
    with pytest.raises(
        ValueError, match=r"Exactly one multi-task strategy.*found 2: UncertaintyWeighting, DWA"
    ):
        fit(ScalarNet(), callbacks=[UncertaintyWeighting(), DWA()])


def test_strategy_on_a_plain_lightning_module():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_idx):
            return self.w.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match=r"must subclass lightning_mtl.MultiTaskModule, got Plain"):
        trainer(max_steps=1, callbacks=[DWA()]).fit(Plain(), dummy_loader(1))


def test_task_losses_not_implemented():
    class NoLosses(MultiTaskModule):
        def __init__(self):
            super().__init__(tasks=["a"])
            self.w = torch.nn.Parameter(torch.ones(1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(NotImplementedError, match="must implement task_losses"):
        fit(NoLosses())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DWA(temperature=0), r"DWA temperature must be > 0.*got 0"),
        (lambda: RLW(distribution="gauss"), r"RLW distribution must be .*got 'gauss'"),
        (lambda: RLW(distribution="dirichlet", concentration=-1), r"concentration must be > 0.*got -1"),
        (
            lambda: UncertaintyWeighting(regularizer="l2"),
            r"regularizer must be 'log' or 'positive', got 'l2'",
        ),
        (lambda: UncertaintyWeighting(lr=-1.0), r"lr must be > 0.*got -1.0"),
        (lambda: UncertaintyWeighting(optimizer="rmsprop"), r"optimizer must be 'match', 'adam' or 'sgd'"),
        (lambda: UncertaintyWeighting(bounds=(1.0, -1.0)), r"bounds must be \(low, high\)"),
        (lambda: UncertaintyWeighting(task_kinds={"a": "ordinal"}), r"task_kinds\['a'\].*got 'ordinal'"),
        (lambda: StaticWeighting({"a": -1.0}), r"finite numbers >= 0, got \[-1.0\]"),
        (lambda: StaticWeighting([0.0, 0.0]), r"all zero"),
    ],
)
def test_invalid_hyper_parameters_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "strategy, match",
    [
        (StaticWeighting({"t0": 1.0, "zz": 1.0}), r"unknown task\(s\) \['zz'\]"),
        (StaticWeighting({"t0": 1.0}), r"no weight for task\(s\) \['t1'\]"),
        (StaticWeighting([1.0, 2.0, 3.0]), r"got 3 weights for 2 tasks"),
        (UncertaintyWeighting(task_kinds={"zz": "regression"}), r"unknown task\(s\) \['zz'\]"),
    ],
)
def test_task_specific_hyper_parameters_checked_against_the_tasks(strategy, match):
    with pytest.raises(ValueError, match=match):
        fit(ScalarNet(), callbacks=[strategy])


def test_gls_rejects_non_positive_losses():
    net = Returning(lambda d: {"t0": d["t0"] * 0.0, "t1": d["t1"]})
    with pytest.raises(ValueError, match=r"GLS needs strictly positive losses, got \{'t0': 0.0\}"):
        fit(net, callbacks=[GLS()])


@pytest.mark.parametrize(
    "tasks, error, match",
    [
        (["a", "a"], ValueError, r"unique; duplicated: \['a'\]"),
        (["a/b"], ValueError, r"Task name 'a/b' is invalid"),
        ([], ValueError, "at least one task"),
        ("ab", TypeError, "list of task names"),
    ],
)
def test_bad_task_registry(tasks, error, match):
    with pytest.raises(error, match=match):
        ScalarNet(k=(1.0,), targets=(0.0,), tasks=tasks)


def test_bad_task_spec():
    with pytest.raises(ValueError, match=r"Task 'a': weight must be a finite number >= 0, got -1"):
        Task("a", weight=-1)
    with pytest.raises(ValueError, match=r"kind must be 'regression' or 'classification', got 'ranking'"):
        Task("a", kind="ranking")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches must be an int >= 1, got 0"),
        ({"gradient_clip_val": -1.0}, r"gradient_clip_val must be a number > 0 or None, got -1.0"),
        ({"gradient_clip_algorithm": "l1"}, "gradient_clip_algorithm must be 'norm' or 'value', got 'l1'"),
        ({"nonfinite": "ignore"}, "nonfinite must be 'raise' or 'skip', got 'ignore'"),
    ],
)
def test_bad_module_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScalarNet(**kwargs)


def test_equal_weighting_warns_when_task_weights_would_be_ignored():
    with pytest.warns(UserWarning, match=r"EqualWeighting ignores Task weights \{'a': 2.0\}"):
        trainer(max_steps=1, callbacks=[EqualWeighting()]).fit(
            TinyNet(tasks=[Task("a", weight=2.0), "b", "c"]), loader(make_data(n=16))
        )
