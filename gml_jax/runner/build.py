"""What a config describes: its checks, the model, the optimizer and the initial state."""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import optax

from gml_jax import models
from gml_jax.balancing import balanced_multimodal
from gml_jax.steps import TrainState, create_train_state, replicate

SCHEDULES = ("constant", "plateau")
OPTIMIZERS = ("sgd", "adam")


def check_config(config: ml_collections.ConfigDict) -> None:
  """The checks that need no data: batch sizes (every device gets an equal share, hence
  every process too), names, files. Raises ValueError naming the field."""
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % jax.device_count():
      raise ValueError(f"config.{name}={config[name]} is not divisible by the "
                       f"{jax.device_count()} devices; use a multiple of {jax.device_count()}.")
  if config.schedule.name not in SCHEDULES:
    raise ValueError(f"Unknown schedule.name {config.schedule.name!r}; expected one of "
                     f"{SCHEDULES}.")
  if config.optimizer.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer.name {config.optimizer.name!r}; expected one of "
                     f"{OPTIMIZERS}.")
  models.backbone(config.model.name)  # raises on an unknown name
  for path in config.model.get("pretrained", ()):
    if path and not pathlib.Path(path).is_file():
      raise FileNotFoundError(f"Pretrained weights file {path} (config.model.pretrained) "
                              "does not exist.")


def model(config: ml_collections.ConfigDict, num_classes: int, num_modalities: int):
  """The fusion network of ``config.model``: the backbone ``model.name``, given the
  ``model`` fields its ``stages()`` takes (e.g. ``width`` for ``small_cnn``)."""
  name = config.model.name
  options = {k: config.model[k] for k in models.backbone_options(name)}
  return models.build(name, num_classes, num_modalities, ratio=config.model.ratio, **options)


def optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The configured optimizer inside the balancing transform; its learning rate is a
  hyperparameter in the optimizer state, so a schedule can change it between steps."""
  o = config.optimizer

  def make_inner(learning_rate):
    if o.name == "sgd":
      inner = optax.sgd(learning_rate, momentum=o.momentum or None)
    else:
      inner = optax.adam(learning_rate)
    if o.weight_decay:
      inner = optax.chain(optax.add_decayed_weights(o.weight_decay), inner)
    return inner

  b = config.balance
  return balanced_multimodal(
      optax.inject_hyperparams(make_inner)(learning_rate=o.learning_rate),
      models.group_labels, method=b.method, alpha=b.alpha, window=b.window,
      warmup_steps=b.warmup_epochs * steps_per_epoch, update=b.update_mode, seed=config.seed)


def initial_state(config, network, tx, example_inputs, mesh) -> TrainState:
  """A fresh state (with converted weights where ``model.pretrained`` names them),
  replicated over ``mesh``; ``example_inputs``: one example's inputs, batch axis first."""
  state = create_train_state(network, tx, example_inputs, config.seed)
  for branch, path in enumerate(config.model.get("pretrained", ())):
    if path:  # a checkpoint, when there is one, replaces them
      variables = models.load_branch_weights(state.variables, branch, path)
      state = state.replace(params=variables.pop("params"), model_state=variables)
  return replicate(state, mesh)
