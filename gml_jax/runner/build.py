"""What a config describes: its checks, the model, the optimizer and the initial state."""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import optax

from gml_jax import models
from gml_jax.balancing import balanced_multimodal
from gml_jax.parallel import replicate
from gml_jax.runner import clone, fields, methods, names, pipeline
from gml_jax.runner.failure import shorten
from gml_jax.steps import TrainState, create_train_state

SCHEDULES = ("constant", "plateau", "step")
OPTIMIZERS = ("sgd", "adam")
COMPUTE_DTYPES = ("float32", "bfloat16")
FUSIONS = ("mmtm", "none")
WANDB_MODES = ("online", "offline", "disabled")
_integer, _number, _one_of = fields.integer, fields.number, fields.one_of


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
    ("schedule.name", _one_of(SCHEDULES)),
    ("schedule.factor", _number(lambda v: 0 < v < 1, "in (0, 1)")),
    ("schedule.patience", _integer(0)),
    ("schedule.threshold", _number(lambda v: v >= 0, ">= 0")),
    ("schedule.min_lr", _number(lambda v: v >= 0, ">= 0")),
    ("schedule.step_epochs", _integer(1)),
)


def config_field(config, path: str):
  """The value of a dotted field path, e.g. ``balance.guided.alpha``."""
  for part in path.split("."):
    config = config[part]
  return config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every value of ``config`` that needs no data, before anything is written: ranges,
  names, batch sizes (every device gets an equal share, hence every process too) and
  files. Raises ValueError (FileNotFoundError for files) naming the field, the value and
  what is expected."""
  _refuse_legacy_fields(config)
  for field, (test, expected) in FIELD_CHECKS:
    value = config_field(config, field)
    if not test(value):
      what = "is unknown" if expected.startswith("one of") else "is invalid"
      raise ValueError(f"config.{field}={shorten(repr(value))} {what}: expected {expected}.")
  _check_backbone_options(config)
  _check_model_inputs(config)
  _check_wandb(config)
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % jax.device_count():
      raise ValueError(f"config.{name}={config[name]} is not divisible by the "
                       f"{jax.device_count()} devices; use a multiple of {jax.device_count()}.")
  for path in config.model.get("pretrained", ()):
    if path and not pathlib.Path(path).is_file():
      raise FileNotFoundError(f"Pretrained weights file {path} (config.model.pretrained) "
                              "does not exist.")


def _refuse_legacy_fields(config) -> None:
  """The flat ``balance.*`` fields of the layout before methods were units: one line
  naming the field that replaced each."""
  for key in config.get("balance", {}):
    if key in methods.LEGACY_FIELDS:
      raise ValueError(f"config.balance.{key} is the old layout: a method's options now live "
                       f"under its name; use config.{methods.LEGACY_FIELDS[key]}.")


def _check_wandb(config) -> None:
  """``logging.wandb``: a mode of W&B's, and the extra installed where a project is named."""
  wandb = config.logging.wandb
  if wandb.mode not in WANDB_MODES:
    raise ValueError(f"config.logging.wandb.mode={shorten(repr(wandb.mode))} is unknown: "
                     f"expected one of {WANDB_MODES}.")
  if wandb.project:
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
      raise ValueError(f"config.logging.wandb.project={wandb.project!r} needs Weights & "
                       "Biases, which is not installed: pip install -e '.[wandb]'.")


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
  method, fusion = methods.get(config.balance.method), config.model.fusion
  if fusion == "mmtm" and len(chosen) < 2:
    raise ValueError(f"config.model.fusion='mmtm' needs two or more data.modalities, got "
                     f"{tuple(chosen)}; use model.fusion='none' for a uni-modal model.")
  for name in methods.names():  # every section's values; the run's method's cross-checks
    section = config.balance.get(name, {})
    methods.get(name).check_options(section, len(chosen), cross_checks=name == method.name)
    changed = [k for k, o in methods.get(name).options.items()
               if name != method.name and k in section and section[k] != o.default]
    if changed:
      raise ValueError(f"config.balance.{name}.{changed[0]}={shorten(repr(section[changed[0]]))} "
                       f"is set, but balance.method={method.name!r} does not read it: set "
                       f"balance.method={name!r}, or leave balance.{name} at its defaults.")
  if method.rebalances and fusion != "mmtm":
    raise ValueError(f"config.balance.method={method.name!r} needs fusion layers "
                     "(model.fusion='mmtm'): it re-balances through them.")
  if len(chosen) < method.min_modalities:
    count = {2: "two", 3: "three"}.get(method.min_modalities, method.min_modalities)
    raise ValueError(f"config.balance.method={method.name!r} needs {count} or more "
                     f"data.modalities; got {tuple(chosen)}.")
  if method.loss == "both" and config.model.head == "joint":
    raise ValueError(f"config.balance.method={method.name!r} trains the fused output's and "
                     "every branch's own loss, which needs a head per branch: "
                     "model.head='branch' (a joint head's shares are not unimodal heads).")
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
  """What the train step minimises (:data:`gml_jax.steps.LOSSES`): the method's own where
  its registration names one (MMPareto's fused plus branches' losses); with a joint head,
  the fused output's cross-entropy alone (OGM-GE's authors' training); else every
  branch's."""
  prescribed = methods.get(config.balance.method).loss
  if prescribed is not None:
    return prescribed
  return "fused" if config.model.head == "joint" else "branches"


def feature_dims(network, example_inputs) -> tuple[int, ...]:
  """D_k of every branch's sown features (the ``features`` of :mod:`gml_jax.extras`),
  traced abstractly: nothing is computed."""
  from gml_jax.pmr import feature_dims as measured

  inputs = tuple(jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x))
                 for x in example_inputs)
  variables = jax.eval_shape(lambda x: network.init(jax.random.key(0), x, train=False), inputs)
  return measured(network, variables, inputs)


def optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
              num_classes: int | None = None, feature_dims=None):
  """The configured optimizer wrapped by the method of ``balance.method`` (given its section
  ``balance.<method>``), inside the balancing transform wherever the model has fusion
  layers (other methods' runs then measure the speeds too, with normal steps only); its
  learning rate is a hyperparameter in the optimizer state, so a schedule can change it
  between steps. ``num_classes`` and ``feature_dims`` (a function returning D_k of every
  branch's sown features) reach methods that size their state by them (PMR)."""
  o = config.optimizer

  def make_inner(learning_rate):
    if o.name == "sgd":
      inner = optax.sgd(learning_rate, momentum=o.momentum or None)
    else:
      inner = optax.adam(learning_rate)
    if o.weight_decay:
      inner = optax.chain(optax.add_decayed_weights(o.weight_decay), inner)
    return inner

  method = methods.get(config.balance.method)
  options = method.defaults()
  options.update(config.balance.get(method.name, {}))
  context = methods.Context(seed=config.seed, steps_per_epoch=steps_per_epoch,
                            num_epochs=config.num_epochs,
                            num_modalities=len(config.data.modalities),
                            labels=models.group_labels, encoder_labels=models.encoder_labels,
                            num_classes=num_classes, feature_dims=feature_dims)
  inner = optax.inject_hyperparams(make_inner)(learning_rate=o.learning_rate)
  return wrapped(method, inner, options, context, fusion=config.model.fusion != "none")


def wrapped(method: methods.Method, inner, options, context: methods.Context,
            fusion: bool = True) -> optax.GradientTransformation:
  """``inner`` wrapped by ``method`` (given its options), inside the balancing transform in
  method "vanilla" where the model has fusion layers (``fusion``) and the method does not
  already re-balance, so that every run measures the speeds."""
  tx = method.transform(inner, options, context)
  if not fusion or method.rebalances:
    return tx
  return balanced_multimodal(tx, models.group_labels, method="vanilla", seed=context.seed)


def initial_state(config, network, tx, example_inputs, mesh) -> TrainState:
  """A fresh state (with converted weights where ``model.pretrained`` names them),
  replicated over ``mesh``; ``example_inputs``: one example's inputs, batch axis first."""
  state = create_train_state(network, tx, example_inputs, config.seed)
  for branch, path in enumerate(config.model.get("pretrained", ())):
    if path:  # a checkpoint, when there is one, replaces them
      variables = models.load_branch_weights(state.variables, branch, path)
      state = state.replace(params=variables.pop("params"), model_state=variables)
  return replicate(state, mesh)
