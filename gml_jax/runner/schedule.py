"""The learning-rate schedule and the early stop, decided at the end of every epoch."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import optax

from gml_jax.parallel import replicate
from gml_jax.runner import names
from gml_jax.steps import TrainState


@dataclasses.dataclass
class PlateauTracker:
  """Reduce-on-plateau bookkeeping: the best training loss so far and the epochs since."""

  best: float = float("inf")
  bad_epochs: int = 0


def learning_rate(opt_state) -> float:
  """The ``learning_rate`` hyperparameter of the (injected) optimizer, wherever it sits."""
  return float(optax.tree_utils.tree_get(opt_state, "learning_rate"))


def with_learning_rate(opt_state, value: float, mesh):
  """The optimizer state with a new learning rate (replicated like the rest)."""
  old = optax.tree_utils.tree_get(opt_state, "learning_rate")
  return optax.tree_utils.tree_set(
      opt_state, learning_rate=replicate(np.asarray(value, np.asarray(old).dtype), mesh))


def plateau(schedule: ml_collections.ConfigDict, tracker: PlateauTracker, loss: float,
            lr: float) -> float:
  """Reduce-on-plateau, as PyTorch's ReduceLROnPlateau (mode min, relative threshold):
  after more than ``patience`` epochs whose training loss did not improve on the best by
  a factor (1 - threshold), multiply the learning rate by ``factor`` (not below
  ``min_lr``). ``tracker`` is updated in place; returns the rate."""
  if loss < tracker.best * (1 - schedule.threshold):
    tracker.best, tracker.bad_epochs = loss, 0
    return lr
  tracker.bad_epochs += 1
  if tracker.bad_epochs > schedule.patience:
    tracker.bad_epochs = 0
    return max(lr * schedule.factor, schedule.min_lr)
  return lr


def end_of_epoch(config, state: TrainState, row: dict, progress, mesh):
  """The learning-rate schedule (plateau, or step: x ``factor`` every ``step_epochs``
  epochs) and the early stop, from the epoch's training metrics
  (``progress``: the run's :class:`~gml_jax.runner.workdir.Progress`, updated in place).
  Returns (state, whether training is finished)."""
  if config.schedule.name == "plateau":
    lr = learning_rate(state.opt_state)
    new_lr = plateau(config.schedule, progress.plateau, row[names.train(names.LOSS)], lr)
    if new_lr != lr:
      print(f"\nEpoch {row[names.EPOCH]}: training loss on a plateau, learning rate {lr:g} -> "
            f"{new_lr:g}.")
      state = state.replace(opt_state=with_learning_rate(state.opt_state, new_lr, mesh))
  if config.schedule.name == "step" and row[names.EPOCH] % config.schedule.step_epochs == 0:
    lr = learning_rate(state.opt_state)  # PyTorch's StepLR, stepped once an epoch
    new_lr = lr * config.schedule.factor
    print(f"\nEpoch {row[names.EPOCH]}: learning rate {lr:g} -> {new_lr:g} (every "
          f"{config.schedule.step_epochs} epochs).")
    state = state.replace(opt_state=with_learning_rate(state.opt_state, new_lr, mesh))
  patience = config.early_stop_full_train_accuracy_epochs
  if patience and row[names.train(names.ACCURACY)] >= 1.0:
    progress.full_accuracy_epochs += 1
    if progress.full_accuracy_epochs >= patience:
      print(f"\nEarly stop after epoch {row[names.EPOCH]}: training accuracy 100% in "
            f"{patience} epochs.")
      return state, True
  return state, False
