"""Strategy and diagnostic state is checkpointed with its task names and configuration, restored by name."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyNet, loader, make_data, trainer
from helpers import bound as attach
from torch import nn

from lightning_mtl.callbacks import GradientConflictMonitor, TaskAffinity
from lightning_mtl.strategies import (
    DWA,
    GLS,
    RLW,
    EqualWeighting,
    GradNorm,
    GradVac,
    NashMTL,
    StaticWeighting,
    UncertaintyWeighting,
)
from lightning_mtl.strategies._learnable import LearnableParameters
from lightning_mtl.task_state import take_tasks, task_order

ABC, CAB = ("a", "b", "c"), ("c", "a", "b")
COLUMN = {"a": 0, "b": 1, "c": 2, "d": 2}


class NamedNet(TinyNet):
    """:class:`TinyNet` whose task ``t`` always fits target column ``COLUMN[t]``, whatever the task order."""

    def task_losses(self, batch, batch_idx):
        x, y = batch
        z = self.encoder(x)
        return {
            t: nn.functional.mse_loss(self.heads[t](z).squeeze(1), y[:, COLUMN[t]]) for t in self.task_names
        }


def bound(strategy, names=ABC):
    return attach(strategy, names)


# ------------------------------------------------------------------------------------------ task_state.py
def test_task_order_maps_current_tasks_to_saved_indices():
    assert task_order("X", ["a", "b", "c"], ["c", "a", "b"]) == [2, 0, 1]
    assert task_order("X", ("a", "b"), ["a", "b"], {"k": (1, 2)}, {"k": [1, 2]}) == [0, 1]  # tuple == list
    assert task_order("X", ["a", "b"], ["b", "a"], {"w": {"a": 1, "b": 2}}, {"w": {"b": 2, "a": 1}}) == [1, 0]


def test_task_order_names_both_task_lists():
    with pytest.raises(ValueError) as err:
        task_order("DWA", ["a", "b", "c"], ["a", "b", "d"])
    msg = str(err.value)
    assert "DWA" in msg and "['a', 'b', 'c']" in msg and "['a', 'b', 'd']" in msg
    assert "no saved state for ['d']" in msg and "saved state for ['c']" in msg
    with pytest.raises(ValueError, match=r"saved for tasks \['a', 'b'\].*tasks are \['a', 'b', 'c'\]"):
        task_order("DWA", ["a", "b"], ["a", "b", "c"])


def test_task_order_names_each_differing_config_key():
    with pytest.raises(ValueError) as err:
        task_order("U", ["a"], ["a"], {"regularizer": "log", "x": 1}, {"regularizer": "positive", "x": 1})
    msg = str(err.value)
    assert "regularizer: saved 'log', current 'positive'" in msg and "x:" not in msg
    with pytest.raises(ValueError, match="new: saved '<absent>', current 3"):
        task_order("U", ["a"], ["a"], {}, {"new": 3})


def test_take_tasks_reorders_the_given_dimensions():
    v = torch.tensor([10.0, 20.0, 30.0])
    assert take_tasks(v, [2, 0, 1]).tolist() == [30.0, 10.0, 20.0]
    assert take_tasks(v, [0, 1, 2]) is v  # identity: no copy
    m = torch.arange(9.0).reshape(3, 3)
    assert torch.equal(take_tasks(m, [2, 0, 1], (0, 1)), m[[2, 0, 1]][:, [2, 0, 1]])
    assert torch.equal(take_tasks(m, [2, 0, 1]), m[[2, 0, 1]])
    with pytest.raises(
        ValueError, match=r"shape \(3,\) has no dimension 0 with one entry per task \(2 tasks\)"
    ):
        take_tasks(v, [1, 0])
    with pytest.raises(ValueError, match="no dimension 1"):
        take_tasks(v, [2, 0, 1], (0, 1))


# ------------------------------------------------------------------------------------------ resume, reordered
STATEFUL = {
    "uncertainty": lambda: UncertaintyWeighting(optimizer="adam", lr=0.05),
    "dwa": lambda: DWA(),
    "rlw": lambda: RLW(seed=3),
    "gradnorm": lambda: GradNorm(alpha=1.5, optimizer="adam", lr=0.05, initial_loss_steps=2),
    "nash": lambda: NashMTL(),
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_resume_into_reordered_tasks_continues_each_task_by_name(tmp_path, name):
    # 2 epochs on [a, b, c], resumed for 2 more on [c, a, b] == 4 epochs straight, task by task
    data = loader(make_data(n=48), batch_size=12)
    straight, s_straight = NamedNet(tasks=ABC), STATEFUL[name]()
    trainer(max_epochs=4, callbacks=[s_straight]).fit(straight, data)

    t1 = trainer(max_epochs=2, callbacks=[STATEFUL[name]()])
    t1.fit(NamedNet(tasks=ABC), data)
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, s_resumed = NamedNet(tasks=CAB), STATEFUL[name]()
    trainer(max_epochs=4, callbacks=[s_resumed]).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")

    assert s_resumed.task_names == CAB
    assert s_resumed.weights == pytest.approx(s_straight.weights, abs=1e-6)
    assert len(set(s_straight.weights.values())) == 3, "the weights must tell the tasks apart"
    expected = straight.state_dict()
    for key, value in resumed.state_dict().items():  # keyed by name: heads.a.weight, ...
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=0, msg=key)


def test_uncertainty_parameters_and_adam_moments_follow_their_task(tmp_path):
    data = loader(make_data(n=32), batch_size=8)
    saved = UncertaintyWeighting(optimizer="adam", lr=0.05)
    t1 = trainer(max_epochs=1, callbacks=[saved])
    t1.fit(NamedNet(tasks=ABC), data)
    t1.save_checkpoint(tmp_path / "c.ckpt")
    restored = UncertaintyWeighting(optimizer="adam", lr=0.05)
    trainer(max_epochs=1, callbacks=[restored]).fit(NamedNet(tasks=CAB), data, ckpt_path=tmp_path / "c.ckpt")
    before = dict(zip(ABC, saved.params.tolist()))
    assert dict(zip(CAB, restored.params.tolist())) == before
    assert len(set(before.values())) == 3
    moments = restored._learnable._pending_optimizer_state or restored._learnable.optimizer.state_dict()
    (slots,) = moments["state"].values()
    (old,) = saved._learnable.optimizer.state_dict()["state"].values()
    for key in ("exp_avg", "exp_avg_sq"):
        assert slots[key].tolist() == old[key][[2, 0, 1]].tolist(), key


def test_learnable_parameters_reorder_every_per_entry_optimizer_tensor():
    learn = LearnableParameters(torch.tensor([1.0, 2.0, 3.0]), "adam", lr=0.1)
    learn.optimizer = torch.optim.Adam([learn.param], lr=0.1)
    learn.accumulate(torch.tensor([0.1, 0.2, 0.3]))
    learn.optimizer.step()
    state = learn.state_dict()
    other = LearnableParameters(torch.zeros(3), "adam", lr=0.1)
    other.optimizer = torch.optim.Adam([other.param], lr=0.1)
    other.load_state_dict(state, [1, 2, 0])
    assert other.param.tolist() == learn.param[[1, 2, 0]].tolist()
    new, old = other.optimizer.state_dict()["state"][0], state["optimizer"]["state"][0]
    assert new["exp_avg"].tolist() == old["exp_avg"][[1, 2, 0]].tolist()
    assert new["exp_avg_sq"].tolist() == old["exp_avg_sq"][[1, 2, 0]].tolist()
    assert float(new["step"]) == float(old["step"])


@pytest.mark.parametrize("probe", ["conflict", "affinity"])
def test_diagnostics_restore_their_matrices_by_name(tmp_path, probe):
    make = {
        "conflict": lambda: GradientConflictMonitor(every_n_steps=1, log_heatmap=False),
        "affinity": lambda: TaskAffinity(every_n_steps=1, lr=0.1, log_heatmap=False),
    }[probe]
    data = loader(make_data(n=32), batch_size=8)
    saved = make()
    t1 = trainer(max_epochs=1, callbacks=[saved])
    t1.fit(NamedNet(tasks=ABC), data)
    t1.save_checkpoint(tmp_path / "c.ckpt")
    restored = make()
    trainer(max_epochs=1, callbacks=[restored]).fit(NamedNet(tasks=CAB), data, ckpt_path=tmp_path / "c.ckpt")

    def by_name(cb):
        matrix = cb.mean_cosine if probe == "conflict" else cb.affinity
        names = cb.task_names
        return {(names[i], names[j]): float(matrix[i, j]) for i in range(3) for j in range(3)}

    assert restored.task_names == CAB
    assert by_name(restored) == by_name(saved)
    assert len(set(by_name(saved).values())) > 3, "the matrix must tell the pairs apart"
    if probe == "conflict":
        assert dict(zip(CAB, restored.mean_norms.tolist())) == dict(zip(ABC, saved.mean_norms.tolist()))


@pytest.mark.parametrize("probe", [GradientConflictMonitor, TaskAffinity])
def test_diagnostics_refuse_another_task_set(probe):
    saved = probe(every_n_steps=1)
    saved.task_names = ABC
    fresh = probe(every_n_steps=1)
    fresh.task_names = ("a", "b", "d")
    with pytest.raises(ValueError, match=rf"{probe.__name__}.*\['a', 'b', 'c'\].*\['a', 'b', 'd'\]"):
        fresh.load_state_dict(saved.state_dict())


# ------------------------------------------------------------------------------------------ refused states
def _trained(strategy, tasks=ABC, epochs=2):
    trainer(max_epochs=epochs, callbacks=[strategy]).fit(NamedNet(tasks=tasks), loader(make_data(n=32), 8))
    return strategy


@pytest.mark.parametrize(
    "make",
    [UncertaintyWeighting, DWA, lambda: RLW(seed=0), GradNorm, NashMTL],
    ids=["uncertainty", "dwa", "rlw", "gradnorm", "nash"],
)
def test_another_task_set_is_a_clear_error(make):
    state = _trained(make()).state_dict()
    assert state["tasks"] == list(ABC)
    fresh = bound(make(), ("a", "b", "d"))
    with pytest.raises(ValueError) as err:
        fresh.load_state_dict(state)
    msg = str(err.value)
    assert type(fresh).__name__ in msg and "['a', 'b', 'c']" in msg and "['a', 'b', 'd']" in msg
    fewer = bound(make(), ("a", "b"))
    with pytest.raises(ValueError, match=r"no saved state for|saved state for \['c'\]"):
        fewer.load_state_dict(state)


def test_uncertainty_checkpoint_into_the_positive_regulariser_is_refused(tmp_path):
    t1 = trainer(max_epochs=1, callbacks=[UncertaintyWeighting()])
    t1.fit(NamedNet(tasks=ABC), loader(make_data(n=32), 8))
    t1.save_checkpoint(tmp_path / "c.ckpt")
    t2 = trainer(max_epochs=2, callbacks=[UncertaintyWeighting(regularizer="positive")])
    with pytest.raises(
        ValueError, match="UncertaintyWeighting.*regularizer: saved 'log', current 'positive'"
    ):
        t2.fit(NamedNet(tasks=ABC), loader(make_data(n=32), 8), ckpt_path=tmp_path / "c.ckpt")


def test_uncertainty_refuses_a_changed_task_kind():
    state = _trained(UncertaintyWeighting(), epochs=1).state_dict()
    fresh = bound(UncertaintyWeighting(task_kinds={"b": "classification"}))
    with pytest.raises(
        ValueError, match=r"task_kinds: saved \{.*'b': 'regression'.*current \{.*'b': 'classif"
    ):
        fresh.load_state_dict(state)
    # init, bounds, optimizer and lr do not change what the parameters mean
    bound(UncertaintyWeighting(init=0.5, bounds=(-5, 5), optimizer="sgd", lr=0.1)).load_state_dict(state)


def test_rlw_refuses_another_distribution_and_draws_per_task_after_reordering():
    state = _trained(RLW(seed=0), epochs=1).state_dict()
    with pytest.raises(ValueError, match="distribution: saved 'normal', current 'dirichlet'"):
        bound(RLW(distribution="dirichlet")).load_state_dict(state)
    plain, reordered = bound(RLW()), bound(RLW(), CAB)
    plain.load_state_dict(state)
    reordered.load_state_dict(state)
    assert reordered.weights == plain.weights
    for s in (plain, reordered):
        s._window_start = True
        s.compute_weights(torch.zeros(3))
    assert reordered.weights == pytest.approx(plain.weights, abs=0)  # the next draw too


def test_dwa_history_follows_its_task():
    saved = _trained(DWA())
    restored = bound(DWA(), CAB)
    restored.load_state_dict(saved.state_dict())
    for old, new in zip(saved._history, restored._history):
        assert dict(zip(CAB, new.tolist())) == dict(zip(ABC, old.tolist()))
    # the temperature does not change what the history means: it may change on resume
    bound(DWA(temperature=5.0)).load_state_dict(saved.state_dict())


@pytest.mark.parametrize("make", [EqualWeighting, GLS, StaticWeighting])
def test_a_strategy_without_state_round_trips(make, tmp_path):
    strategy = bound(make())
    assert strategy.state_dict() == {"tasks": list(ABC), "config": {}, "state": {}}
    bound(make(), CAB).load_state_dict(strategy.state_dict())
    t1 = trainer(max_epochs=1, callbacks=[make()])
    t1.fit(NamedNet(tasks=ABC), loader(make_data(n=16), 8))
    t1.save_checkpoint(tmp_path / "c.ckpt")
    trainer(max_epochs=2, callbacks=[make()]).fit(
        NamedNet(tasks=CAB), loader(make_data(n=16), 8), ckpt_path=tmp_path / "c.ckpt"
    )


def test_a_checkpoint_without_task_names_loads_by_position_with_a_warning():
    trained = _trained(UncertaintyWeighting(), epochs=1)
    legacy = trained.state_dict()["state"]  # lightning-mtl 0.1 saved this dict alone
    fresh = bound(UncertaintyWeighting())
    with pytest.warns(UserWarning, match="written without task names.*restored by position"):
        fresh.load_state_dict(legacy)
    assert fresh.params.tolist() == trained.params.tolist()
    with pytest.raises(ValueError, match=r"without task names.*2 tasks \['a', 'b'\].*shape \(3,\)"):
        bound(UncertaintyWeighting(), ("a", "b")).load_state_dict(legacy)
    dwa = _trained(DWA()).state_dict()["state"]
    with pytest.raises(ValueError, match=r"DWA: .*without task names.*4 tasks"):
        bound(DWA(), ("a", "b", "c", "d")).load_state_dict(dwa)


def test_loading_before_the_strategy_is_attached_is_a_clear_error():
    state = _trained(DWA(), epochs=1).state_dict()
    with pytest.raises(RuntimeError, match=r"DWA state can only be loaded once .*ckpt_path"):
        DWA().load_state_dict(state)


# ------------------------------------------------------------------------------------------ method state
def test_nash_alpha_reorders_and_checks_its_size():
    nash = bound(NashMTL())
    nash._alpha, nash._failures = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 2
    state = nash.method_state()
    other = bound(NashMTL(), CAB)
    other.load_method_state(state, [2, 0, 1])
    assert other._alpha.tolist() == [3.0, 1.0, 2.0] and other._failures == 2
    same = bound(NashMTL())
    same.load_method_state(state, None)
    assert same._alpha.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="one entry per task"):
        bound(NashMTL(), ("a", "b")).load_method_state(state, None)
    same.load_method_state({}, None)  # reset
    assert same._alpha is None and same._failures == 0
    assert NashMTL().method_config() == {}  # mode, the one that changes α's meaning, is in the base's config


def test_gradvac_targets_reorder_on_both_dimensions():
    vac = bound(GradVac())
    vac._targets = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    state = vac.method_state()
    other = bound(GradVac(), CAB)
    other.load_method_state(state, [2, 0, 1])
    names_old, names_new = ABC, CAB
    for i, a in enumerate(names_new):
        for j, b in enumerate(names_new):
            assert other.targets[i, j] == vac.targets[names_old.index(a), names_old.index(b)]
    with pytest.raises(ValueError, match="one entry per task"):
        bound(GradVac(), ("a", "b")).load_method_state(state, None)
    other.load_method_state({}, None)
    assert other.targets is None
    assert GradVac().method_config() == {}
