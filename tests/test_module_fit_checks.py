"""Mistakes a new user makes, refused when the fit starts (issue 7, items 8 and 9): overriding ``training_step``,
and the Trainer flags ``gradient_clip_val`` / ``accumulate_grad_batches`` that manual optimisation rejects."""

from __future__ import annotations

import pytest
from helpers import ScalarNet, dummy_loader, trainer


class OverridesTrainingStep(ScalarNet):
    def training_step(self, batch, batch_idx):  # what a LightningModule user writes out of habit
        losses = self.task_losses(batch, batch_idx)
        return sum(losses.values())


def test_overriding_training_step_is_refused_when_the_fit_starts():
    net = OverridesTrainingStep()
    with pytest.raises(
        TypeError, match=r"OverridesTrainingStep overrides training_step.*nothing trains.*task_losses"
    ):
        trainer(max_steps=2).fit(net, dummy_loader(2))
    assert net.theta.item() == 1.0


def test_overriding_training_step_does_not_stop_evaluation():
    trainer().validate(OverridesTrainingStep(), dummy_loader(1), verbose=False)


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("gradient_clip_val", 1.0, r"MultiTaskModule\(tasks=\.\.\., gradient_clip_val=1\.0\)"),
        ("accumulate_grad_batches", 2, r"MultiTaskModule\(tasks=\.\.\., accumulate_grad_batches=2\)"),
    ],
)
def test_trainer_flags_of_automatic_optimisation_point_to_the_module_argument(flag, value, match):
    with pytest.raises(
        ValueError, match=rf"Trainer\({flag}={value}\) does not apply to a MultiTaskModule.*{match}"
    ):
        trainer(max_steps=1, **{flag: value}).fit(ScalarNet(), dummy_loader(1))


def test_the_checks_also_run_when_configure_callbacks_is_overridden_without_super():
    class OwnCallbacks(OverridesTrainingStep):
        def configure_callbacks(self):
            return []

    with pytest.raises(TypeError, match="overrides training_step"):  # setup() checks too
        trainer(max_steps=1).fit(OwnCallbacks(), dummy_loader(1))


def test_trainer_flags_do_not_matter_outside_fit():
    trainer(gradient_clip_val=1.0, accumulate_grad_batches=2).validate(
        ScalarNet(), dummy_loader(1), verbose=False
    )
