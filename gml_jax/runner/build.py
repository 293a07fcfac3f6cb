"""What a config describes: its checks, the model, the optimizer and the initial state."""

from __future__ import annotations

import math
import pathlib

import jax
import ml_collections
import optax

from gml_jax import models
from gml_jax.balancing import METHODS, UPDATE_MODES, balanced_multimodal
from gml_jax.modulation import ogm_ge
from gml_jax.parallel import replicate
from gml_jax.runner import clone, names, pipeline
from gml_jax.runner.failure import shorten
from gml_jax.steps import TrainState, create_train_state

SCHEDULES = ("constant", "plateau", "step")
OPTIMIZERS = ("sgd", "adam")
COMPUTE_DTYPES = ("float32", "bfloat16")
FUSIONS = ("mmtm", "none")
# What OGM-GE modulates: every parameter of a branch, or its encoder's kernels of rank >= 2
# (not biases, normalisation or heads: the authors' scope).
OGM_SCOPES = ("branch", "encoder_kernels")


def _integer(low: int):
  return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
          f"an integer >= {low}")


def _number(test, text: str):
  return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v) and test(v), f"a finite number {text}")


def _one_of(choices):
  return (lambda v: v in choices, f"one of {tuple(choices)}")


def _shares(v) -> bool:
  return v == () or (isinstance(v, (tuple, list)) and all(
      isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in v)
      and sum(v) <= 1 + 1e-9)


def _epoch_window(v) -> bool:
  return v == () or (isinstance(v, (tuple, list)) and len(v) == 2 and all(
      isinstance(e, int) and not isinstance(e, bool) for e in v) and 0 <= v[0] <= v[1])


# Every checked config field: (field, (test, what is expected)).
FIELD_CHECKS = (
    ("seed", _integer(0)),
    ("batch_size", _integer(1)),
    ("eval_batch_size", _integer(1)),
    ("num_epochs", _integer(1)),
    ("log_every_steps", _integer(1)),
    ("checkpoint_every_steps", _integer(0)),
    ("steps_per_call", _integer(1)),
    ("early_stop_full_train_accuracy_epochs", _integer(0)),
    ("utilization_every_epoch", (lambda v: isinstance(v, bool), "true or false")),
    ("utilization_train_examples", _integer(0)),
    ("data.name", _one_of(clone.datasets())),
    ("data.image_size", _integer(0)),
    ("data.normalize", _one_of(pipeline.NORMALIZATIONS)),
    ("data.hflip", (lambda v: isinstance(v, bool), "true or false")),
    ("model.name", _one_of(models.BACKBONES)),
    ("model.ratio", _number(lambda v: v > 0, "> 0")),
    ("model.dtype", _one_of(COMPUTE_DTYPES)),
    ("model.fusion", _one_of(FUSIONS)),
    ("model.head", _one_of(models.HEADS)),
    ("optimizer.name", _one_of(OPTIMIZERS)),
    ("optimizer.learning_rate", _number(lambda v: v > 0, "> 0")),
    ("optimizer.momentum", _number(lambda v: 0 <= v < 1, "in [0, 1)")),
    ("optimizer.weight_decay", _number(lambda v: v >= 0, ">= 0")),
    ("balance.method", _one_of(names.BALANCE_METHODS)),
    ("balance.alpha", _number(lambda v: v >= 0, ">= 0")),
    ("balance.window", _integer(1)),
    ("balance.target", _integer(0)),
    ("balance.random_shares", (_shares, "() (uniform draws) or one probability in [0, 1] "
                               "per modality, summing to at most 1")),
    ("balance.warmup_epochs", _integer(0)),
    ("balance.update_mode", _one_of(UPDATE_MODES)),
    ("balance.ogm_alpha", _number(lambda v: v > 0, "> 0")),
    ("balance.ogm_noise", (lambda v: isinstance(v, bool), "true or false")),
    ("balance.ogm_continuous", (lambda v: isinstance(v, bool), "true or false")),
    ("balance.ogm_scope", _one_of(OGM_SCOPES)),
    ("balance.ogm_epochs", (_epoch_window, "() (every epoch) or (first, last) epochs, "
                            "0 <= first <= last")),
    ("schedule.name", _one_of(SCHEDULES)),
    ("schedule.factor", _number(lambda v: 0 < v < 1, "in (0, 1)")),
    ("schedule.patience", _integer(0)),
    ("schedule.threshold", _number(lambda v: v >= 0, ">= 0")),
    ("schedule.min_lr", _number(lambda v: v >= 0, ">= 0")),
    ("schedule.step_epochs", _integer(1)),
)


def config_field(config, path: str):
  """The value of a dotted field path, e.g. ``balance.alpha``."""
  for part in path.split("."):
    config = config[part]
  return config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every value of ``config`` that needs no data, before anything is written: ranges,
  names, batch sizes (every device gets an equal share, hence every process too) and
  files. Raises ValueError (FileNotFoundError for files) naming the field, the value and
  what is expected."""
  for field, (test, expected) in FIELD_CHECKS:
    value = config_field(config, field)
    if not test(value):
      what = "is unknown" if expected.startswith("one of") else "is invalid"
      raise ValueError(f"config.{field}={shorten(repr(value))} {what}: expected {expected}.")
  _check_backbone_options(config)
  _check_model_inputs(config)
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % jax.device_count():
      raise ValueError(f"config.{name}={config[name]} is not divisible by the "
                       f"{jax.device_count()} devices; use a multiple of {jax.device_count()}.")
  for path in config.model.get("pretrained", ()):
    if path and not pathlib.Path(path).is_file():
      raise FileNotFoundError(f"Pretrained weights file {path} (config.model.pretrained) "
                              "does not exist.")


def _check_backbone_options(config) -> None:
  """``model.<backbone>``: options the backbone's ``stages()`` takes; an integer where its
  default is one (>= 1)."""
  name = config.model.name
  given = config.model.get(name, {})
  known = models.backbone_options(name)
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(f"config.model.{name}.{unknown[0]} is unknown: backbone {name!r} takes "
                     f"{list(known) or 'no options'}.")
  for option, default in models.backbone_defaults(name).items():
    value = given.get(option, default)
    if isinstance(default, int) and not _integer(1)[0](value):
      raise ValueError(f"config.model.{name}.{option}={shorten(repr(value))} is invalid: "
                       "expected an integer >= 1.")


def _check_model_inputs(config) -> None:
  """``data.modalities`` against the dataset, and what the fusion and the method need."""
  available = len(clone.dataset_modalities(config.data.name))
  chosen = config.data.modalities
  if (not isinstance(chosen, (tuple, list)) or not chosen or len(set(chosen)) != len(chosen)
      or not all(isinstance(m, int) and not isinstance(m, bool) and 0 <= m < available
                 for m in chosen)):
    raise ValueError(f"config.data.modalities={shorten(repr(chosen))} is invalid: expected "
                     f"distinct integer indices of {config.data.name}'s {available} "
                     "modalities, e.g. (0, 1) or (0,).")
  method, fusion = config.balance.method, config.model.fusion
  if fusion == "mmtm" and len(chosen) < 2:
    raise ValueError(f"config.model.fusion='mmtm' needs two or more data.modalities, got "
                     f"{tuple(chosen)}; use model.fusion='none' for a uni-modal model.")
  if method == "fixed" and config.balance.target >= len(chosen):
    raise ValueError(f"config.balance.target={config.balance.target} is invalid: method "
                     f"'fixed' re-balances a branch, and the model has {len(chosen)} "
                     f"(data.modalities={tuple(chosen)}).")
  shares = config.balance.random_shares
  if shares and (method != "random" or len(shares) != len(chosen)):
    raise ValueError(f"config.balance.random_shares={tuple(shares)} is invalid: expected () or, "
                     f"with balance.method='random', one share per branch ({len(chosen)}); got "
                     f"method={method!r}.")
  if method in ("random", "guided", "fixed") and fusion != "mmtm":
    raise ValueError(f"config.balance.method={method!r} needs fusion layers "
                     "(model.fusion='mmtm'): it re-balances through them.")
  if method == "ogm_ge" and len(chosen) < 2:
    raise ValueError("config.balance.method='ogm_ge' needs two or more data.modalities.")
  if config.model.head == "joint" and (fusion != "none" or len(chosen) < 2):
    raise ValueError("config.model.head='joint' (one head over every branch's features) "
                     "needs model.fusion='none' and two or more data.modalities; got "
                     f"model.fusion={fusion!r}, data.modalities={tuple(chosen)}.")


def model(config: ml_collections.ConfigDict, num_classes: int):
  """The network of ``config.model``: one branch of backbone ``model.name`` per modality
  of ``data.modalities``, given the options under ``model.<name>`` (e.g.
  ``model.small_cnn.width``), with MMTM between them or no fusion (``model.fusion``)."""
  name = config.model.name
  options = dict(config.model.get(name, {}))
  return models.build(name, num_classes, len(config.data.modalities), ratio=config.model.ratio,
                      fusion=config.model.fusion == "mmtm", head=config.model.head, **options)


def loss(config: ml_collections.ConfigDict) -> str:
  """What the train step minimises (:data:`gml_jax.steps.LOSSES`): with a joint head, the
  fused output's cross-entropy alone (OGM-GE's authors' training); else every branch's."""
  return "fused" if config.model.head == "joint" else "branches"


def ogm_window(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """``balance.ogm_epochs`` (first, last), both included as in the authors' code, as the
  transform's window of updates; () (every epoch): None."""
  if not config.balance.ogm_epochs:
    return None
  first, last = config.balance.ogm_epochs
  return first * steps_per_epoch, (last + 1) * steps_per_epoch


def optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The configured optimizer, inside OGM-GE for ``balance.method='ogm_ge'``, inside the
  balancing transform wherever the model has fusion layers (OGM-GE's runs then measure the
  speeds too, with normal steps only); its learning rate is a hyperparameter in the
  optimizer state, so a schedule can change it between steps."""
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
  tx = optax.inject_hyperparams(make_inner)(learning_rate=o.learning_rate)
  if b.method == "ogm_ge":
    encoder_kernels = b.ogm_scope == "encoder_kernels"
    tx = ogm_ge(tx, models.encoder_labels if encoder_kernels else models.group_labels,
                alpha=b.ogm_alpha, noise=b.ogm_noise, seed=config.seed,
                continuous=b.ogm_continuous, scope="kernels" if encoder_kernels else "branch",
                window=ogm_window(config, steps_per_epoch))
  if config.model.fusion == "none":
    return tx
  return balanced_multimodal(
      tx, models.group_labels, method=b.method if b.method in METHODS else "vanilla",
      alpha=b.alpha, window=b.window, warmup_steps=b.warmup_epochs * steps_per_epoch,
      update=b.update_mode, seed=config.seed, target=b.target,
      shares=tuple(b.random_shares) or None)


def initial_state(config, network, tx, example_inputs, mesh) -> TrainState:
  """A fresh state (with converted weights where ``model.pretrained`` names them),
  replicated over ``mesh``; ``example_inputs``: one example's inputs, batch axis first."""
  state = create_train_state(network, tx, example_inputs, config.seed)
  for branch, path in enumerate(config.model.get("pretrained", ())):
    if path:  # a checkpoint, when there is one, replaces them
      variables = models.load_branch_weights(state.variables, branch, path)
      state = state.replace(params=variables.pop("params"), model_state=variables)
  return replicate(state, mesh)
