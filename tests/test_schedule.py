"""Trainer features any config can use: the plateau schedule and the early stop."""


import ml_collections
import numpy as np
import pytest
from run_helpers import epoch_rows, tiny_config

from gml_jax.runner import schedule, trainer
from gml_jax.runner.checkpoints import Progress

SCHEDULE = ml_collections.ConfigDict(
    {"name": "plateau", "factor": 0.3, "patience": 2, "threshold": 0.1, "min_lr": 0.01})


def test_plateau_follows_reduce_lr_on_plateau():
  # Hand-derived: best 1.0; 0.95 is not a 10% improvement -> bad epochs 1, 2, 3 > patience 2
  # -> lr x 0.3; then 0.5 improves; three bad epochs again -> x 0.3, floored at 0.01.
  tracker, lr, rates = schedule.PlateauTracker(), 0.1, []
  for loss in (1.0, 0.95, 0.95, 0.95, 0.5, 0.49, 0.48, 0.47, 0.47):
    lr = schedule.plateau(SCHEDULE, tracker, loss, lr)
    rates.append(lr)
  np.testing.assert_allclose(rates, [0.1, 0.1, 0.1, 0.03, 0.03, 0.03, 0.03, 0.01, 0.01])


def test_plateau_schedule_changes_the_learning_rate_in_training(data_dir, tmp_path):
  config = tiny_config("vanilla", data_dir)
  config.num_epochs = 3
  config.schedule.update(name="plateau", patience=0, threshold=0.99, factor=0.5, min_lr=1e-4)
  trainer.train_and_evaluate(config, tmp_path)
  epochs = epoch_rows(tmp_path)
  # threshold 0.99: no epoch improves on the first; patience 0: halve after each. The log
  # gives the rate each epoch trained with.
  assert [e["learning_rate"] for e in epochs] == pytest.approx([0.01, 0.01, 0.005])


def test_early_stop_after_epochs_at_full_training_accuracy(data_dir, tmp_path):
  config = tiny_config("vanilla", data_dir)
  config.early_stop_full_train_accuracy_epochs = 2
  progress = Progress()
  state = object()  # untouched with a constant schedule
  end = lambda epoch, accuracy: schedule.end_of_epoch(
      config, state, {"epoch": epoch, "train_accuracy": accuracy}, progress, None)
  assert end(1, 1.0) == (state, False)
  assert end(2, 0.9) == (state, False)
  assert end(3, 1.0) == (state, True)


def test_step_schedule_multiplies_the_rate_every_step_epochs():
  # PyTorch's StepLR(step_size=2, gamma=0.1) stepped once an epoch: epochs 1-2 train at
  # 0.1, 3-4 at 0.01, 5 at 0.001; the rate changes after epochs 2 and 4.
  import optax

  from gml_jax.parallel import data_mesh
  from gml_jax.steps import TrainState

  config = tiny_config("vanilla", "unused")
  config.schedule.update(name="step", step_epochs=2, factor=0.1)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  state = TrainState(params={}, model_state={}, opt_state=tx.init({}))
  rates = []
  for epoch in range(1, 6):
    rates.append(schedule.learning_rate(state.opt_state))
    state, stop = schedule.end_of_epoch(
        config, state, {"epoch": epoch, "train_accuracy": 0.5}, Progress(), data_mesh())
    assert not stop
  np.testing.assert_allclose(rates, [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)
