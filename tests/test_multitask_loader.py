"""MultiTaskLoader: one DataLoader per task, joint or sampled, seeded, resumable, sharded under DDP."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import restore_environ, trainer
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset, WeightedRandomSampler

from lightning_mtl import MultiTaskModule, Task
from lightning_mtl.data import MultiTaskLoader, task_eval_loaders


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread avoids thread contention on a shared machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ids(n: int, batch_size: int = 2, shuffle: bool = False, **kwargs) -> DataLoader:
    """A loader whose batches are ``(sample ids,)``."""
    return DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size, shuffle=shuffle, **kwargs)


def as_ids(batch: dict) -> dict[str, list[int]]:
    return {t: b[0].tolist() for t, b in batch.items()}


def run(loader: MultiTaskLoader, epochs: int) -> list[dict[str, list[int]]]:
    return [as_ids(b) for _ in range(epochs) for b in loader]


def sampled(**kwargs) -> MultiTaskLoader:
    loaders = {"a": ids(10), "b": ids(40, shuffle=True), "c": ids(160, batch_size=4, shuffle=True)}
    kwargs.setdefault("seed", 0)
    return MultiTaskLoader(loaders, mode="sampled", **kwargs)


def chi_square(counts: Counter, probs: dict[str, float], total: int) -> float:
    return sum((counts[t] - total * p) ** 2 / (total * p) for t, p in probs.items())


# chi-square critical values at 1 - 1e-4 (df = 1, 2): a seeded test, so this is a loose bound, not a flaky one
CHI2_CRIT = {1: 15.14, 2: 18.42}


# ---------------------------------------------------------------------------------------------------- joint
def test_joint_cycles_shorter_loaders_and_epoch_is_the_longest():
    loader = MultiTaskLoader({"a": ids(10), "b": ids(4), "c": ids(6, batch_size=4)})
    assert len(loader) == 5
    steps = run(loader, 2)
    assert len(steps) == 10 and all(list(s) == ["a", "b", "c"] for s in steps)
    assert [s["a"] for s in steps[:5]] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    # shorter loaders cycle; every loader starts a new pass with the epoch
    assert [s["a"] for s in steps[5:]] == [s["a"] for s in steps[:5]]
    assert [s["b"] for s in steps] == ([[0, 1], [2, 3]] * 3)[:5] * 2
    assert [s["c"] for s in steps] == ([[0, 1, 2, 3], [4, 5]] * 3)[:5] * 2
    assert loader.epoch == 1


def test_an_epoch_is_a_function_of_seed_and_epoch():
    reference = run(sampled(), 3)
    loader = sampled()
    loader.set_epoch(2)  # what Lightning does at each epoch start, through loader.sampler.set_epoch
    assert run(loader, 1) == reference[2 * 65 :]
    loader.sampler.set_epoch(1)
    assert run(loader, 1) == reference[65 : 2 * 65]


def test_joint_reshuffles_every_pass_of_a_shuffled_loader():
    loader = MultiTaskLoader({"long": ids(40), "short": ids(6, shuffle=True)}, seed=1)
    passes = [sum((s["short"] for s in chunk), []) for chunk in _chunks(run(loader, 1), 3)]
    assert len(passes) == 6
    assert all(sorted(p) == list(range(6)) for p in passes)  # each pass is a permutation
    assert len({tuple(p) for p in passes}) > 1  # reshuffled per pass


def _chunks(steps, size):
    return [steps[i : i + size] for i in range(0, len(steps) - size + 1, size)]


def test_rejects_sampled_options_in_joint_mode():
    with pytest.raises(ValueError, match="only apply to mode='sampled'"):
        MultiTaskLoader({"a": ids(4), "b": ids(4)}, weights="proportional")


# ---------------------------------------------------------------------------------------------------- sampled
def test_sampled_frequencies_match_p():
    loader = sampled(weights={"a": 1.0, "b": 2.0, "c": 5.0}, steps_per_epoch=4000)
    probs = loader.probabilities
    assert probs == pytest.approx({"a": 1 / 8, "b": 2 / 8, "c": 5 / 8})
    steps = run(loader, 1)
    assert len(steps) == 4000 and all(len(s) == 1 for s in steps)
    counts = Counter(t for s in steps for t in s)
    assert chi_square(counts, probs, 4000) < CHI2_CRIT[2]
    for t, p in probs.items():  # and 4 sigma per task
        assert abs(counts[t] - 4000 * p) < 4 * math.sqrt(4000 * p * (1 - p))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0, math.inf])
def test_proportional_with_temperature(temperature):
    loader = sampled(weights="proportional", temperature=temperature, steps_per_epoch=3000)
    sizes = {"a": 10, "b": 40, "c": 160}
    raw = {t: n ** (1 / temperature) for t, n in sizes.items()}
    expected = {t: w / sum(raw.values()) for t, w in raw.items()}
    assert loader.probabilities == pytest.approx(expected, rel=1e-12)
    counts = Counter(t for s in run(loader, 1) for t in s)
    assert chi_square(counts, expected, 3000) < CHI2_CRIT[2]


def test_explicit_weights_take_the_temperature_too():
    loader = sampled(weights={"a": 1, "b": 4, "c": 16}, temperature=2.0)
    assert loader.probabilities == pytest.approx({"a": 1 / 7, "b": 2 / 7, "c": 4 / 7})


def test_uniform_default_and_epoch_length():
    loader = sampled()
    assert loader.probabilities == pytest.approx(dict.fromkeys("abc", 1 / 3))
    assert len(loader) == 5 + 20 + 40  # one pass over every loader, one task per step
    assert len(sampled(tasks_per_step=2)) == math.ceil(65 / 2)
    assert len(sampled(steps_per_epoch=7)) == 7


def test_without_replacement_when_tasks_per_step_is_2():
    loader = sampled(weights={"a": 1.0, "b": 2.0, "c": 5.0}, tasks_per_step=2, steps_per_epoch=3000)
    steps = run(loader, 1)
    assert all(len(s) == 2 for s in steps)  # two distinct tasks, in the loaders' order
    assert all(list(s) == sorted(s) for s in steps)
    p = loader.probabilities
    # successive draws without replacement: P(i in) = p_i + sum_{j != i} p_j p_i / (1 - p_j)
    inclusion = {i: p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in p if j != i) for i in p}
    assert sum(inclusion.values()) == pytest.approx(2)
    counts = Counter(t for s in steps for t in s)
    for t, q in inclusion.items():
        assert abs(counts[t] - 3000 * q) < 4 * math.sqrt(3000 * q * (1 - q))


def test_every_task_is_drawn_when_tasks_per_step_is_all():
    steps = run(sampled(tasks_per_step=3, steps_per_epoch=5), 1)
    assert all(list(s) == ["a", "b", "c"] for s in steps)


def test_sampled_batches_cycle_each_task_in_passes():
    steps = run(sampled(steps_per_epoch=400), 1)
    seen_b = [s["b"] for s in steps if "b" in s]
    passes = [sum(seen_b[i : i + 20], []) for i in range(0, len(seen_b) - 19, 20)]
    assert len(passes) >= 3 and all(sorted(p) == list(range(40)) for p in passes)


def test_same_seed_same_sequence_other_seed_differs():
    first, second, other = (run(sampled(seed=s), 2) for s in (5, 5, 6))
    assert first == second
    assert [list(s) for s in first] != [list(s) for s in other]


def test_default_seed_is_lightning_global_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    from_env = run(sampled(seed=None), 1)
    assert from_env == run(sampled(seed=5), 1)
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert run(sampled(seed=None), 1) == run(sampled(seed=0), 1)


def test_draws_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    run(sampled(), 2)
    run(MultiTaskLoader({"a": ids(10, shuffle=True), "b": ids(4, shuffle=True)}), 2)
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("mode", ["joint", "sampled"])
@pytest.mark.parametrize("cut", [0, 7, 65, 80])  # before the start, mid-epoch, at the epoch end, mid-epoch 2
def test_state_dict_round_trip_continues_the_sequence(mode, cut, tmp_path):
    def make():
        loaders = {"a": ids(10), "b": ids(40, shuffle=True), "c": ids(160, batch_size=4, shuffle=True)}
        if mode == "joint":
            return MultiTaskLoader(loaders, seed=3, steps_per_epoch=65)
        return MultiTaskLoader(loaders, mode="sampled", weights="proportional", temperature=2.0, seed=3)

    reference = run(make(), 3)
    loader, done = make(), []
    while len(done) < cut:  # iterate like Lightning: one iter() per epoch, stop anywhere
        for batch in loader:
            done.append(as_ids(batch))
            if len(done) == cut:
                break
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    rest = []
    while len(done) + len(rest) < len(reference):
        rest += [as_ids(b) for b in resumed]
    assert done + rest == reference


def test_load_state_dict_rejects_another_configuration():
    loader = sampled()
    run(loader, 1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="tasks_per_step=1"):
        sampled(tasks_per_step=2).load_state_dict(state)
    with pytest.raises(ValueError, match="probabilities"):
        sampled(weights="proportional").load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0"):
        sampled(seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="tasks"):
        MultiTaskLoader({"a": ids(10), "z": ids(4)}, mode="sampled").load_state_dict(state)
    with pytest.raises(ValueError, match="not a MultiTaskLoader state"):
        sampled().load_state_dict({"foo": 1})


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(loaders={}), "loaders is empty"),
        (dict(loaders=[ids(4)]), "must be a dict"),
        (dict(loaders={"a": [1, 2]}), "task 'a' is a list, not a torch.utils.data.DataLoader"),
        (dict(loaders={"a": ids(3, batch_size=4, drop_last=True)}), "task 'a' has no batch"),
        (dict(loaders={"a": ids(0)}), "task 'a' has no batch"),
        (dict(mode="mixed"), "mode must be"),
        (dict(mode="sampled", weights={"a": 1, "b": 1, "zz": 1}), r"unknown task\(s\) \['zz'\]"),
        (dict(mode="sampled", weights={"a": 1}), r"no weight for task\(s\) \['b'\]"),
        (dict(mode="sampled", weights={"a": 1, "b": 0}), "weight of task 'b' must be a finite number > 0"),
        (dict(mode="sampled", weights={"a": 1, "b": -2.0}), "weight of task 'b'"),
        (dict(mode="sampled", weights={"a": 1, "b": math.nan}), "weight of task 'b'"),
        (dict(mode="sampled", weights="sizes"), "weights must be 'uniform', 'proportional'"),
        (dict(mode="sampled", temperature=0), "temperature must be > 0"),
        (dict(mode="sampled", temperature=-1.0), "temperature must be > 0"),
        (dict(mode="sampled", tasks_per_step=0), "tasks_per_step must be between 1 and the number of tasks"),
        (dict(mode="sampled", tasks_per_step=3), r"number of tasks \(2\), got 3"),
        (dict(mode="sampled", tasks_per_step=1.0), "tasks_per_step must be an int"),
        (dict(steps_per_epoch=0), "steps_per_epoch must be a positive int"),
        (dict(seed=-1), "seed must be a non-negative int"),
    ],
)
def test_clear_errors(kwargs, match):
    kwargs.setdefault("loaders", {"a": ids(4), "b": ids(6)})
    with pytest.raises(ValueError, match=match):
        MultiTaskLoader(**kwargs)


def test_iterable_dataset_is_rejected():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(4))

    with pytest.raises(ValueError, match="iterable-style dataset"):
        MultiTaskLoader({"a": DataLoader(Stream(), batch_size=2)})


def test_custom_sampler_is_used_as_given():
    weighted = DataLoader(
        TensorDataset(torch.arange(8)),
        batch_size=2,
        sampler=WeightedRandomSampler([0.0] * 4 + [1.0] * 4, 8, generator=torch.Generator().manual_seed(0)),
    )
    steps = run(MultiTaskLoader({"a": ids(16), "w": weighted}), 1)
    assert all(i >= 4 for s in steps for i in s["w"])


def test_use_distributed_sampler_false_iterates_the_loaders_as_given():
    user = DataLoader(TensorDataset(torch.arange(6)), batch_size=2, shuffle=False)
    loader = MultiTaskLoader({"a": user, "b": ids(2)}, use_distributed_sampler=False)
    assert loader._prepare()["a"].loader is user
    assert [s["a"] for s in run(loader, 1)] == [[0, 1], [2, 3], [4, 5]]


# ---------------------------------------------------------------------------------------------------- Lightning
class Recorder(pl.LightningModule):
    """Records, per training step, the tasks and sample ids of the batch; optionally writes them per rank."""

    def __init__(self, directory: str | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.records: list[tuple[int, int, dict[str, list[int]]]] = []
        self.directory = directory

    def training_step(self, batch, batch_idx):
        self.records.append((self.current_epoch, batch_idx, as_ids(batch)))
        return (self.w - 1.0) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self):
        if self.directory is not None:
            torch.save(self.records, os.path.join(self.directory, f"rank{self.global_rank}.pt"))


class ValRecorder(Recorder):
    """Also records validation batches, ``(dataloader_idx, batch)``, written to ``val<rank>.pt``."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.val_records: list[tuple[int, dict[str, list[int]]]] = []

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_records.append((dataloader_idx, as_ids(batch)))

    def on_train_end(self):
        super().on_train_end()
        torch.save(self.val_records, os.path.join(self.directory, f"val{self.global_rank}.pt"))


class SaveAt(pl.Callback):
    """Saves ``at_step.ckpt`` after global step ``step`` and ``epoch<k>.ckpt`` at each epoch end."""

    def __init__(self, directory, step: int) -> None:
        self.directory, self.step = directory, step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.directory / "at_step.ckpt")

    def on_train_epoch_end(self, trainer, *args):
        trainer.save_checkpoint(self.directory / f"epoch{trainer.current_epoch}.ckpt")


def test_resume_through_a_lightning_checkpoint_continues_the_draws(tmp_path):
    def make():
        return sampled(weights="proportional", temperature=2.0, steps_per_epoch=12)

    full = Recorder()
    trainer(max_epochs=3, callbacks=[SaveAt(tmp_path, step=17)]).fit(full, make())
    assert len(full.records) == 36
    state = torch.load(tmp_path / "at_step.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert state["combined_loader"][0]["position"] == 5  # Lightning saved the loader's state
    for name, done in (("at_step.ckpt", 17), ("epoch0.ckpt", 12)):
        resumed = Recorder()
        trainer(max_epochs=3).fit(resumed, make(), ckpt_path=str(tmp_path / name))
        assert resumed.records == full.records[done:], name
    # iteration-based training (max_steps): Lightning loads the loader's state at an epoch end too, and the next
    # epoch starts. (Lightning 2.6.6 then runs one extra step numbered epoch 0 / batch 12 before its epoch 1, whose
    # set_epoch is 2: a plain DataLoader gets the same extra step; the loader follows Lightning's epoch numbers.)
    resumed = Recorder()
    trainer(max_epochs=-1, max_steps=14).fit(resumed, make(), ckpt_path=str(tmp_path / "epoch0.ckpt"))
    assert resumed.records[0][2] == full.records[12][2]


class PerTaskNet(MultiTaskModule):
    """A shared linear encoder and one head per task; each task's batch is ``(x, y)`` from its own dataset."""

    def __init__(self, tasks=("small", "large")) -> None:
        super().__init__(tasks=tasks)
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in self.task_names})

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch, batch_idx):
        return {
            t: nn.functional.mse_loss(self.heads[t](self.encoder(x)).squeeze(1), y)
            for t, (x, y) in batch.items()
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def regression(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.randn(4, generator=g))


def joint_loader() -> MultiTaskLoader:
    return MultiTaskLoader(
        {
            "small": DataLoader(regression(24, 1), batch_size=8, shuffle=True),
            "large": DataLoader(regression(80, 2), batch_size=8, shuffle=True),
        },
        seed=0,
    )


def params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_joint_fit_trains_and_resumes_on_the_same_trajectory(tmp_path):
    full = PerTaskNet()
    trainer(max_epochs=2, callbacks=[SaveAt(tmp_path, step=13)]).fit(full, joint_loader())
    assert full.trainer.global_step == 20  # epochs of the longest loader (10 batches)
    data = joint_loader()
    with torch.no_grad():
        untrained, trained = (
            {t: model.task_losses({t: dl.dataset.tensors}, 0)[t] for t, dl in data.loaders.items()}
            for model in (PerTaskNet(), full)
        )
    for t in data.tasks:  # both tasks learned
        assert trained[t] < 0.5 * untrained[t], (t, trained[t], untrained[t])
    resumed = PerTaskNet()
    trainer(max_epochs=2).fit(resumed, joint_loader(), ckpt_path=str(tmp_path / "at_step.ckpt"))
    torch.testing.assert_close(params(resumed), params(full), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- evaluation
def test_task_eval_loaders_key_batches_by_task_in_order():
    val = {"a": ids(5), "b": DataLoader(TensorDataset(torch.arange(3)), batch_size=None)}
    loaders = task_eval_loaders(val)
    assert [len(dl) for dl in loaders] == [3, 3]
    assert [as_ids(b) for b in loaders[0]] == [{"a": [0, 1]}, {"a": [2, 3]}, {"a": [4]}]
    assert [{t: v[0].item() for t, v in b.items()} for b in loaders[1]] == [{"b": 0}, {"b": 1}, {"b": 2}]


class EvalRecorder(Recorder):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.records.append((dataloader_idx, batch_idx, as_ids(batch)))


def test_task_eval_loaders_give_one_dataloader_idx_per_task():
    module = EvalRecorder()
    trainer().validate(module, task_eval_loaders({"a": ids(4), "b": ids(2)}), verbose=False)
    assert module.records == [(0, 0, {"a": [0, 1]}), (0, 1, {"a": [2, 3]}), (1, 0, {"b": [0, 1]})]


def test_sampled_fit_with_partial_tasks_and_per_task_validation():
    """Sampled mode needs partial tasks (a step's batch holds the drawn tasks only); each task is validated on its
    own loader, logged per dataloader_idx (the k-th task's loader)."""
    train = {"small": regression(24, 1), "large": regression(80, 2)}
    val = {"small": regression(16, 3), "large": regression(16, 4)}
    module = PerTaskNet(tasks=[Task("small", partial=True), Task("large", partial=True)])
    fit = trainer(max_epochs=2, num_sanity_val_steps=0)
    fit.fit(
        module,
        MultiTaskLoader(
            {t: DataLoader(ds, batch_size=8, shuffle=True) for t, ds in train.items()},
            mode="sampled",
            weights="proportional",
            seed=0,
        ),
        val_dataloaders=task_eval_loaders({t: DataLoader(ds, batch_size=8) for t, ds in val.items()}),
    )
    assert fit.global_step == 2 * 13  # ceil((3 + 10) / 1) steps per epoch
    metrics = fit.callback_metrics
    with torch.no_grad():
        for k, (t, ds) in enumerate(val.items()):
            expected = module.task_losses({t: ds.tensors}, 0)[t]
            torch.testing.assert_close(metrics[f"val/loss/{t}/dataloader_idx_{k}"], expected)
            other = "large" if t == "small" else "small"
            assert f"val/loss/{other}/dataloader_idx_{k}" not in metrics  # each loader holds one task


def test_worker_processes_resume_mid_pass(tmp_path):
    def make():
        return MultiTaskLoader(
            {
                "a": ids(12, shuffle=True, num_workers=1),
                "b": ids(4, shuffle=True, num_workers=1, persistent_workers=True),
            },
            seed=2,
        )

    reference = run(make(), 2)
    loader = make()
    done = [as_ids(b) for _, b in zip(range(4), loader)]  # (range first: zip stops before a 5th next)
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert done + run(resumed, 1) + run(resumed, 1) == reference
    assert done == reference[:4]


# ---------------------------------------------------------------------------------------------------- DDP
def _ddp_loader(**kwargs) -> MultiTaskLoader:
    return MultiTaskLoader(
        {"a": ids(8, shuffle=True), "b": ids(16), "c": ids(24, batch_size=4, shuffle=True)},
        mode="sampled",
        weights="proportional",
        seed=0,
        **kwargs,
    )


@pytest.mark.timeout(240)
def test_ddp_ranks_draw_the_same_tasks_and_see_disjoint_samples(tmp_path):
    with restore_environ():
        os.environ["OMP_NUM_THREADS"] = "1"  # for the spawned processes
        val = task_eval_loaders({"a": ids(8), "b": ids(4)})  # sharded by Lightning (plain DataLoaders)
        ddp = trainer(strategy="ddp_spawn", devices=2, max_epochs=2, num_sanity_val_steps=0)
        ddp.fit(ValRecorder(str(tmp_path)), _ddp_loader(), val_dataloaders=val)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    vals = [torch.load(tmp_path / f"val{r}.pt", weights_only=True) for r in (0, 1)]
    for k, (task, n) in enumerate((("a", 8), ("b", 4))):  # each rank validates its half of each task's data
        shards = [
            {i for idx, b in records[: len(records) // 2] if idx == k for i in b[task]} for records in vals
        ]
        assert all(set(b) == {task} for records in vals for idx, b in records if idx == k)
        assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(n))
    # per rank, a:8/2 samples -> 2 batches, b: 16/2 -> 4, c: 24/2 -> 3; an epoch is 9 steps
    assert len(ranks[0]) == len(ranks[1]) == 18
    tasks = [[list(s) for _, _, s in records] for records in ranks]
    assert tasks[0] == tasks[1]  # the same draws on both ranks ...
    single = _ddp_loader(steps_per_epoch=9)  # ... and the same as one process with the same seed
    assert tasks[0] == [list(s) for s in run(single, 2)]
    complete = 0
    for task, per_pass in (("a", 2), ("b", 4), ("c", 3)):
        for epoch in (0, 1):  # passes restart with each epoch
            seen = [[s[task] for e, _, s in records if e == epoch and task in s] for records in ranks]
            for start in range(0, len(seen[0]) - per_pass + 1, per_pass):  # every complete pass
                complete += 1
                shards = [set(sum(rank_seen[start : start + per_pass], [])) for rank_seen in seen]
                assert not shards[0] & shards[1], task  # disjoint
                assert (
                    len(shards[0] | shards[1]) == {"a": 8, "b": 16, "c": 24}[task]
                )  # and together the dataset
    assert complete >= 2


def test_a_custom_sampler_must_shard_itself_under_ddp(monkeypatch):
    import lightning_mtl.data.multitask_loader as mtl

    monkeypatch.setattr(mtl, "_world", lambda: (2, 0))
    weighted = DataLoader(
        TensorDataset(torch.arange(8)), batch_size=2, sampler=WeightedRandomSampler([1.0] * 8, 8)
    )
    with pytest.raises(ValueError, match="cannot shard over 2 processes"):
        len(MultiTaskLoader({"a": ids(4), "w": weighted}))
    own = DataLoader(TensorDataset(torch.arange(8)), batch_size=2, sampler=DistributedSampler(range(8), 2, 0))
    assert len(MultiTaskLoader({"a": ids(4), "d": own})) == 2


def test_example_runs():
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "multitask_loader.py"))
    results = example["main"](["--epochs", "1"])
    assert set(results) == {"house", "rent"}
    assert all(0 < loss < 0.3 for loss in results.values()), results


def test_compare_runs_on_a_config_with_per_task_loaders_and_partial_labels(tmp_path, monkeypatch):
    """The issue's end-to-end check: ``lightning-mtl compare --config`` whose data module returns a
    MultiTaskLoader and one validation loader per task (partial tasks); each task's loss reaches the table."""
    from lightning_mtl.cli import main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    out = tmp_path / "cmp"
    main(
        [
            "compare", "--config", "examples/multitask_loader_config.yaml", "--strategies", "equal,pcgrad",
            "--epochs", "1", "--baselines", "none", "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    rows = [
        line for line in (out / "results.md").read_text().splitlines() if line.startswith("| EqualWeighting")
    ]
    cells = [c.strip() for c in rows[0].split("|")[2:4]]
    assert all(float(c) > 0 for c in cells), rows  # house/loss and rent/loss, each from its own loader
