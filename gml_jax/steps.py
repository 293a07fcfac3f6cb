"""Pure train and eval steps for any model of :mod:`gml_jax.protocol`.

The state is a plain pytree (:class:`TrainState`); a step is ``(state, batch) ->
(state, metrics)``, compiled once and data-parallel with :mod:`gml_jax.parallel`.

A batch is ``{"inputs": (x_0, ..., x_{N-1}), "label": int32[B]}``, optionally with
``"mask"`` (float[B], 0 for padding examples, used by evaluation). The model is a Linen
module or an NNX model that follows :mod:`gml_jax.protocol`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gml_jax.balancing import NORMAL_STEP, StepMode, find_balance_state, keep_frozen
from gml_jax.extras import (
  StepPass,
  extra_args,
  loss_needs_of,
  loss_terms,
  mean_cross_entropies,
  needs_of,
  pullback_each,
  transform_metrics,
  true_class_scores,  # noqa: F401 (its home before gml_jax.extras; still imported from here)
)
from gml_jax.fusion import TRAIN_MEANS
from gml_jax.labels import Labels
from gml_jax.protocol import as_functional, check_model, check_outputs

# What a train step minimises: Σ_k CE(ŷ_k, y) (every branch's own loss, the balancing
# paper's), CE(ŷ, y) alone (the fused output's, as OGM-GE's authors train), or both summed
# (CE(ŷ, y) + Σ_k CE(ŷ_k, y): MMPareto's multimodal plus unimodal losses).
LOSSES = ("branches", "fused", "both")


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step.

  The step count lives in the optimizer state (e.g. ``balance_state(opt_state).step``).

  Attributes:
    params: the model parameters.
    model_state: the model's other collections (``batch_stats``, ``fusion_stats``).
    opt_state: the optimizer state, holding the balancing state.
  """

  params: Any
  model_state: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {"params": self.params, **self.model_state}


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, example_inputs, seed: int = 0
) -> TrainState:
  """Initialises the model on ``example_inputs`` (a tuple of N arrays; shapes only matter)
  and the optimizer. An NNX model keeps the weights it was built with.

  A Linen model and its optimizer state are initialised by one compiled program: the
  forward pass runs abstractly (``lazy_init`` on the inputs' shapes) and only the
  initializers compute. Same variables, bitwise, as an eager ``init``, which compiles
  every initializer of every shape apart (a persistent compilation cache keeps one
  program, not hundreds of small ones).
  """
  model = as_functional(model)
  check_model(model, ("train",), "create_train_state")
  inputs = tuple(jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in example_inputs)

  def state_of(variables) -> TrainState:
    variables = dict(variables)
    variables.pop(TRAIN_MEANS, None)  # measured after training, not carried
    if "params" not in variables:
      raise ValueError("create_train_state: the model has no parameters ('params' collection).")
    params = variables.pop("params")
    return TrainState(params=params, model_state=variables, opt_state=tx.init(params))

  if hasattr(model, "lazy_init"):
    init = jax.jit(lambda key: state_of(model.lazy_init(key, inputs, train=False)))
    return init(jax.random.key(seed))
  return state_of(model.init(jax.random.key(seed), inputs, train=False))


# --------------------------------------------------------------------------------------
# Loss and metrics


def branch_cross_entropy(branch_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of every branch and example: float[N, B] from logits [N, B, classes].
  The training loss is the sum over branches of the mean over examples."""
  ce = jax.vmap(optax.softmax_cross_entropy_with_integer_labels, in_axes=(0, None))
  return ce(branch_logits, labels)


def training_loss(loss: str, logits: jax.Array, branch_losses: jax.Array,
                  labels: jax.Array) -> jax.Array:
  """The loss a step minimises (see :data:`LOSSES`), from the fused logits [B, C], the
  branches' mean losses float[N] and the labels int[B]."""
  fused = lambda: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  if loss == "fused":
    return fused()
  if loss == "both":
    return fused() + jnp.sum(branch_losses)
  return jnp.sum(branch_losses)


def _check_loss(loss: str, caller: str) -> None:
  if loss not in LOSSES:
    raise ValueError(f"{caller}: loss must be one of {LOSSES}, got {loss!r}.")


def _correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def cast_floats(tree: Any, dtype: Any) -> Any:
  """``tree`` with its floating-point arrays cast to ``dtype`` (unchanged when None)."""
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# --------------------------------------------------------------------------------------
# Steps


def _step_needs(state: TrainState) -> tuple[tuple, tuple, list]:
  """What ``tx.update`` needs, what the transforms' loss terms need, and the collections
  the training forward pass updates (``intermediates`` too when features are needed)."""
  needs, loss_needs = needs_of(state.opt_state), loss_needs_of(state.opt_state)
  sown = "features" in needs or "features" in loss_needs
  return needs, loss_needs, list(state.model_state) + (["intermediates"] if sown else [])


def _loss_terms(opt_state, loss_needs, new_model_state, labels) -> jax.Array:
  """:func:`gml_jax.extras.loss_terms` from the forward pass's sown features and labels."""
  given = {"label": labels,
           "features": tuple(new_model_state.get("intermediates", {}).get("features", ()))}
  return loss_terms(opt_state, **{n: given[n] for n in loss_needs})


def _kept_model_state(mode: StepMode | None, labels, new: dict, old: dict) -> dict:
  """The forward pass's updated collections, those of the groups a re-balancing step
  freezes (``mode``; None: no balancing) kept as they were; each collection is labelled by
  the same rules as the params."""

  def kept(new, old):
    if mode is not None:
      new = keep_frozen(mode, labels, new, old)
    return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)

  return {name: kept(collection, old[name]) for name, collection in new.items()}


def _grads_from_loss_grads(forward, loss: str, labels, params):
  """The step's gradients for a transform that needs ``loss_grads`` (MMPareto's): one
  forward pass and the pullback of its N + 1 mean losses (fused, then each branch's), and
  the step's gradient as their sum under ``loss``, so the step runs N + 1 backward passes
  rather than N + 2 and a second forward pass. Returns (grads, aux as ``loss_fn``'s,
  loss_grads)."""

  def mean_losses(params):
    (logits, branch_logits), new_model_state = forward(params)
    return mean_cross_entropies(logits, branch_logits, labels), (new_model_state, logits,
                                                                 branch_logits)

  values, pullback, (new_model_state, logits, branch_logits) = jax.vjp(
      mean_losses, params, has_aux=True)
  loss_grads = pullback_each(pullback, values)
  weights = jnp.asarray([loss != "branches"] + [loss != "fused"] * (values.shape[0] - 1),
                        values.dtype)  # which of the N + 1 losses the step minimises
  grads = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1).astype(g.dtype), loss_grads)
  value = training_loss(loss, logits, values[1:], labels)
  return grads, (new_model_state, logits, branch_logits, values[1:], value), loss_grads


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    labels: Labels | None = None,
    compute_dtype: Any = None,
    loss: str = "branches",
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The train step of a multi-modal network, uncompiled: ``(state, batch) -> (state,
  metrics)``.

  ``model`` follows :mod:`gml_jax.protocol` (a Linen module, or an NNX model, which is
  wrapped with :func:`gml_jax.nnx.wrap`); the loss is Σ_k CE(ŷ_k, y) (``loss="branches"``),
  CE(ŷ, y) (``loss="fused"``; the branches' losses are then only reported) or their sum
  (``loss="both"``, MMPareto's), plus the terms that transforms in ``tx`` add to it
  (:func:`gml_jax.extras.loss_terms`: PMR's prototype term, from the features the model
  sows and the labels; the reported ``loss`` includes them). When ``tx`` contains
  :func:`gml_jax.balanced_multimodal`, the step reads the re-balancing target from the
  optimizer state, passes it as ``cut`` to the forward pass, updates the parameters, and
  keeps the model state (BatchNorm statistics, the cuts' running means) of the groups that
  this step freezes. ``labels`` labels every variable collection (params, batch_stats,
  fusion_stats: the same rules apply to each): :func:`gml_jax.label_rules` for your own
  model; None: the model's own ``labels`` attribute (the library's
  :class:`~gml_jax.FusionNetwork` carries :func:`gml_jax.group_labels`).
  Any other optimizer works too (every step is then a normal step). ``tx.update`` is given
  the extra arguments that the transforms in ``tx`` declare they need, and only those
  (:mod:`gml_jax.extras`: ``scores`` for :func:`gml_jax.ogm_ge`, the loss ``value`` for
  ``optax.contrib.reduce_on_plateau``, per-loss gradients, mono-modal logits, features);
  a plain optimizer costs nothing extra.

  Metrics: loss, accuracies and the target of every step, and those of every transform in
  ``tx`` that reports its own (:func:`transform_metrics`: μ, s_k and d_speed when ``tx``
  balances; OGM-GE's ratios and coefficients when it contains :func:`gml_jax.ogm_ge`).

  ``compute_dtype`` (e.g. ``jnp.bfloat16`` or ``"bfloat16"``; None or float32: none):
  mixed precision. The forward and backward
  passes see the parameters and inputs cast to it, so activations, matmuls and convolutions
  run in it; the parameters, their gradients, the optimizer state, BatchNorm statistics
  and fusion running means stay float32, and so do the logits, the loss, μ, M and the
  balancing decisions.
  """

  labels = labels if labels is not None else getattr(model, "labels", None)
  model = as_functional(model)
  check_model(model, ("train", "cut"), "make_train_step")
  _check_loss(loss, "make_train_step")
  tx = optax.with_extra_args_support(tx)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    balance = find_balance_state(state.opt_state)
    balancing = balance is not None
    if balancing and labels is None:
      raise ValueError(
          "make_train_step: tx re-balances (it contains gml_jax.balanced_multimodal), so the "
          "step must know which variables each branch owns to keep them frozen: pass "
          "labels= (e.g. gml_jax.label_rules([...])) or give the model a `labels` attribute.")
    # Read before tx.update: the mode of *this* step (afterwards it is the next step's).
    mode = StepMode(balance.target, balance.update_all) if balancing else None
    target = mode.target if balancing else jnp.full((), NORMAL_STEP, jnp.int32)
    needs, loss_needs, collections = _step_needs(state)

    def apply(params, *, train: bool, cut, mutable=False, inputs=None):
      """(logits, branch_logits) in float32 and the updated collections (or {})."""
      inputs = batch["inputs"] if inputs is None else inputs
      outputs = model.apply(
          {"params": cast_floats(params, compute_dtype), **state.model_state},
          cast_floats(tuple(inputs), compute_dtype),
          train=train,
          cut=cut,
          mutable=mutable,
      )
      outputs, new_model_state = outputs if mutable is not False else (outputs, {})
      logits, branch_logits = check_outputs(outputs, batch["label"].shape[0], "make_train_step")
      return (logits.astype(jnp.float32), branch_logits.astype(jnp.float32)), new_model_state

    # The step's training-mode forward pass.
    forward = lambda params: apply(params, train=True, cut=target, mutable=collections)

    def loss_fn(params):
      (logits, branch_logits), new_model_state = forward(params)
      losses = jnp.mean(branch_cross_entropy(branch_logits, batch["label"]), axis=-1)
      value = training_loss(loss, logits, losses, batch["label"])
      if loss_needs:  # the transforms' own terms (PMR's), differentiated with the loss
        value = value + _loss_terms(state.opt_state, loss_needs, new_model_state, batch["label"])
      return value, (new_model_state, logits, branch_logits, losses, value)

    if "loss_grads" in needs and not loss_needs:
      grads, aux, loss_grads = _grads_from_loss_grads(forward, loss, batch["label"],
                                                      state.params)
    else:
      (grads, aux), loss_grads = jax.grad(loss_fn, has_aux=True)(state.params), None
    new_model_state, logits, branch_logits, losses, loss_value = aux
    new_model_state = dict(new_model_state)
    step = StepPass(outputs=lambda p: forward(p)[0], logits=logits, branch_logits=branch_logits,
                    labels=batch["label"], value=loss_value, loss_grads=loss_grads,
                    evaluate=lambda cut: apply(state.params, train=False, cut=cut)[0],
                    intermediates=new_model_state.pop("intermediates", {}),
                    inputs=tuple(batch["inputs"]),
                    evaluate_on=lambda inputs: apply(state.params, train=False, cut=-1,
                                                     inputs=inputs)[0])
    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   **extra_args(needs, state.params, step))
    params = optax.apply_updates(state.params, updates)

    model_state = _kept_model_state(mode, labels, new_model_state, state.model_state)

    metrics = {
        "loss": loss_value,
        "branch_loss": losses,
        "accuracy": jnp.mean(_correct(logits, batch["label"])),
        "branch_accuracy": jnp.mean(_correct(branch_logits, batch["label"]), axis=-1),
        "target": target,
    }
    metrics |= transform_metrics(opt_state)
    new_state = TrainState(params=params, model_state=model_state, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, loss: str = "branches") -> Callable[[TrainState, dict], dict]:
  """Eval step with normal fusion: sums of correct predictions (fused and per branch), of
  the loss the train step minimises (``loss``, see :func:`make_train_step`) and the number of
  real examples, so that results add up over batches. ``model`` follows
  :mod:`gml_jax.protocol`."""
  model = as_functional(model)
  check_model(model, ("train",), "make_eval_step")
  _check_loss(loss, "make_eval_step")

  def eval_step(state: TrainState, batch: dict) -> dict:
    logits, branch_logits = check_outputs(
        model.apply(state.variables, tuple(batch["inputs"]), train=False),
        batch["label"].shape[0], "make_eval_step")
    weight = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    fused = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    branches = jnp.sum(branch_cross_entropy(branch_logits, batch["label"]), axis=0)
    example_loss = {"fused": fused, "branches": branches, "both": fused + branches}[loss]
    return {
        "count": jnp.sum(weight),
        "correct": jnp.sum(_correct(logits, batch["label"]) * weight),
        "branch_correct": jnp.sum(_correct(branch_logits, batch["label"]) * weight, axis=-1),
        "loss_sum": jnp.sum(example_loss * weight),
    }

  return eval_step


def make_multi_step(train_step: Callable, steps: int) -> Callable:
  """``steps`` train steps in one call: ``(state, batches) -> (state, metrics)``, where
  every leaf of ``batches`` and of the metrics has a leading axis of length ``steps``.

  The steps run one after the other inside one compiled function (an unrolled
  ``lax.scan``), so the balancing state machine stays exact step by step; what it saves is
  the per-call overhead of dispatch, which dominates small models on CPU. A rolled scan
  is much slower on XLA:CPU, hence ``unroll``.
  """
  if steps < 1:
    raise ValueError(f"steps per call must be >= 1, got {steps}.")

  def multi_step(state: TrainState, batches: dict) -> tuple[TrainState, dict]:
    return jax.lax.scan(train_step, state, batches, unroll=True)

  return multi_step
