"""The step protocol: what a transform needs from the train step beyond the gradients, and
what it reports.

A transform whose ``update`` takes more than ``(updates, state, params)`` says so in its
state's class, so that any step (the library's :func:`gml_jax.make_train_step`, or your
own) can ask the optimizer state instead of knowing the transform by name::

  class MyState(NamedTuple):
    NEEDS = ("scores",)                      # keyword arguments of update
    METRICS = {"my_ratio": "my_ratio_{m}"}   # train_metrics() key -> log key
    ratio: jax.Array
    def train_metrics(self): return {"my_ratio": self.ratio}

* ``NEEDS``: names from :data:`EXTRA_ARGS`; the step computes those (and only those) that
  some state in ``tx`` needs, and passes them as keywords to ``tx.update``.
* ``METRICS``: every key that ``train_metrics()`` returns, with its name in the logs: a
  template with ``{m}`` (a float[N] array, one value per modality, written once per dataset
  modality ``m``) or without (a scalar). A key returned and not declared is an error at the
  step's first trace (:func:`transform_metrics`), never dropped silently.

The states are found anywhere in the optimizer state (inside ``optax.chain``,
``inject_hyperparams``, ``MultiSteps``, ``nnx.Optimizer``), so the declarations compose.
Known optax states need no declaration: ``optax.contrib.reduce_on_plateau`` needs ``value``.

The extra arguments (N modalities, B examples, C classes):

* ``scores``: float32[N], per branch the batch's sum of the softmax probability of the
  true class (:func:`true_class_scores`; OGM-GE's s_k).
* ``value``: float32 scalar, the loss the step minimises.
* ``loss_grads``: a tree like the parameters whose leaves have a leading axis of N + 1: [0]
  the gradient of the fused output's mean cross-entropy, [1 + k] that of branch k's own
  mean cross-entropy (one backward pass each, in the same compiled step).
* ``mono_logits``: float32[N, B, C], row k branch k's logits when every cross-modal signal
  entering it is its running mean (``cut=k``, evaluation mode): what branch k predicts from
  its own modality alone. With late fusion (no cuts) it equals ``branch_logits``.
* ``features``: a tuple of N arrays [B, ...], the features the model sows in its top-level
  ``__call__``, once per branch in branch order (``self.sow("intermediates", "features",
  h_k)``); :class:`gml_jax.FusionNetwork` sows every branch's pooled features.
* ``label``: int[B], the batch's true classes (PMR's prototype scores).
* ``mono_losses``: float32[N], s_k, the batch's mean (clamped) cross-entropy of modality
  k's Shapley mono-modal output: the fused logits of every non-empty subset of modalities,
  the others' inputs zeros, in evaluation mode (``cut=-1``), combined by Shapley weights
  (:func:`gml_jax.agm.shapley_losses`; AGM). One forward vmapped over the 2^N - 1 subsets.

The loss hook. A method that changes the loss (PMR's prototype term) declares
``LOSS_NEEDS`` (names from :data:`LOSS_ARGS`) and a method ``loss_term(**inputs) -> scalar``;
the step adds :func:`loss_terms` to the loss inside the differentiated function, so the
term's gradient reaches the parameters (a hand-written step does the same)::

  def loss_fn(params):
    (logits, branch_logits), inter = forward(params)            # mutable=["intermediates"]
    value = my_loss(logits, branch_logits, label)
    inputs = {"features": sown_features(inter["intermediates"]), "label": label}
    return value + loss_terms(opt_state, **{n: inputs[n] for n in loss_needs_of(opt_state)})

A method whose loss is the fused output's plus every branch's (MMPareto) needs no term: it
asks for ``make_train_step(..., loss="both")`` (the runner's registration sets it).

A hand-written step calls :func:`needs_of` once on the optimizer state and
:func:`extra_args` with what its forward pass produced.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

EXTRA_ARGS = ("scores", "value", "loss_grads", "mono_logits", "features", "label",
              "mono_losses")
"""The names a state's ``NEEDS`` may hold (the module docstring says what each is)."""

LOSS_ARGS = ("features", "label")
"""The names a state's ``LOSS_NEEDS`` may hold: the training forward pass's sown features
(differentiable) and the labels."""

# optax's own states that need an extra argument (they cannot declare it themselves).
KNOWN_NEEDS = {optax.contrib.ReduceLROnPlateauState: ("value",)}


def _states(opt_state: Any) -> list:
  """Every node of ``opt_state`` that declares NEEDS or METRICS, outermost first."""
  found = []

  def visit(node) -> bool:  # visits every node; descends everywhere
    if type(node) in KNOWN_NEEDS or hasattr(type(node), "NEEDS") or hasattr(
        type(node), "METRICS"):
      found.append(node)
    return False

  jax.tree.leaves(opt_state, is_leaf=visit)
  return found


def needs_of(opt_state: Any) -> tuple[str, ...]:
  """The extra arguments that the transforms whose states are in ``opt_state`` need, in
  :data:`EXTRA_ARGS` order; () for a plain optimizer. An unknown name is an error naming
  the state."""
  needed = set()
  for state in _states(opt_state):
    needs = KNOWN_NEEDS.get(type(state), getattr(type(state), "NEEDS", ()))
    unknown = [n for n in needs if n not in EXTRA_ARGS]
    if unknown:
      raise ValueError(f"{type(state).__name__}.NEEDS names {unknown}; a step can compute "
                       f"{EXTRA_ARGS} (gml_jax.extras).")
    needed |= set(needs)
  return tuple(n for n in EXTRA_ARGS if n in needed)


def loss_needs_of(opt_state: Any) -> tuple[str, ...]:
  """What the loss terms of the states in ``opt_state`` need (:data:`LOSS_ARGS` order); ()
  when no state adds a term to the loss."""
  needed = set()
  for state in _states(opt_state):
    needs = getattr(type(state), "LOSS_NEEDS", ())
    unknown = [n for n in needs if n not in LOSS_ARGS]
    if unknown:
      raise ValueError(f"{type(state).__name__}.LOSS_NEEDS names {unknown}; a step can give "
                       f"{LOSS_ARGS} (gml_jax.extras).")
    needed |= set(needs)
  return tuple(n for n in LOSS_ARGS if n in needed)


def loss_terms(opt_state: Any, **inputs: Any) -> jax.Array:
  """The sum of ``loss_term(**needed inputs)`` of every state in ``opt_state`` that declares
  ``LOSS_NEEDS`` (0.0 when none does): what a step adds to its loss inside the
  differentiated function. ``inputs``: at least the names :func:`loss_needs_of` returns."""
  total = jnp.zeros((), jnp.float32)
  for state in _states(opt_state):
    needs = getattr(type(state), "LOSS_NEEDS", None)
    if needs is None:
      continue
    missing = [n for n in needs if inputs.get(n) is None]
    if missing:
      raise ValueError(f"loss_terms: {type(state).__name__} needs {missing} for its loss "
                       "term; pass them as keywords.")
    total = total + state.loss_term(**{n: inputs[n] for n in needs})
  return total


def metric_keys(opt_state: Any) -> dict[str, str]:
  """Every metric the transforms in ``opt_state`` declare -> its log-key template."""
  keys = {}
  for state in _states(opt_state):
    keys |= getattr(type(state), "METRICS", {})
  return keys


def transform_metrics(opt_state: Any) -> dict:
  """The metrics of every transform state in ``opt_state`` (``train_metrics()``: the
  balancing state's μ, speeds and d_speed; OGM-GE's ratios and coefficients), merged. A key
  that a state returns without declaring it in ``METRICS`` is a ValueError."""
  metrics = {}
  for state in _states(opt_state):
    if not hasattr(state, "train_metrics"):
      continue
    reported = state.train_metrics()
    declared = getattr(type(state), "METRICS", {})
    undeclared = sorted(set(reported) - set(declared))
    if undeclared:
      raise ValueError(f"{type(state).__name__}.train_metrics() returns {undeclared}, which "
                       f"its METRICS ({sorted(declared)}) does not declare: add each with "
                       "its log key, e.g. {'my_ratio': 'my_ratio_{m}'}.")
    metrics |= reported
  return metrics


def true_class_scores(branch_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """float[N]: per branch, the batch's sum of the softmax probability of the true class
  (the ``scores`` of :func:`gml_jax.ogm_ge`).

  Args:
    branch_logits: float[N, B, C], every branch's logits stacked on a first axis.
    labels: int[B], the true classes.
  """
  if not hasattr(branch_logits, "shape") or jnp.ndim(branch_logits) != 3:
    got = (f"a {type(branch_logits).__name__}" if not hasattr(branch_logits, "shape")
           else f"shape {branch_logits.shape}")
    raise ValueError("true_class_scores: branch_logits must be one array [N, B, C] (the "
                     f"branches' logits stacked with jnp.stack); got {got}.")
  if jnp.shape(labels) != jnp.shape(branch_logits)[1:2] or not jnp.issubdtype(
      jnp.result_type(labels), jnp.integer):
    raise ValueError(f"true_class_scores: labels must be int[B] with B = "
                     f"{jnp.shape(branch_logits)[1]}; got {jnp.result_type(labels)} "
                     f"{jnp.shape(labels)}.")
  probs = jax.nn.softmax(branch_logits, axis=-1)
  return jnp.sum(jnp.take_along_axis(probs, labels[None, :, None], axis=-1)[..., 0], axis=-1)


def mean_cross_entropies(logits: jax.Array, branch_logits: jax.Array,
                         labels: jax.Array) -> jax.Array:
  """float[N + 1]: the fused output's mean cross-entropy, then every branch's."""
  ce = optax.softmax_cross_entropy_with_integer_labels
  fused = jnp.mean(ce(logits, labels))
  branches = jnp.mean(jax.vmap(ce, in_axes=(0, None))(branch_logits, labels), axis=-1)
  return jnp.concatenate([fused[None], branches])


@dataclasses.dataclass(frozen=True)
class StepPass:
  """What a train step's forward pass gives :func:`extra_args`.

  Attributes:
    outputs: function of the parameters -> (logits [B, C], branch_logits [N, B, C]) of the
      step's own (training) forward pass; used for ``loss_grads``.
    logits: the fused logits [B, C] of the step.
    branch_logits: every branch's logits [N, B, C] of the step.
    labels: int[B].
    value: the loss the step minimised.
    evaluate: function of ``cut`` -> (logits, branch_logits) of an evaluation-mode
      forward pass with that cut; used for ``mono_logits``.
    intermediates: the ``intermediates`` collection of the step's forward pass (or {}).
    inputs: the batch's inputs, a tuple of N arrays (or None); used for ``mono_losses``.
    evaluate_on: function of inputs -> (logits, branch_logits) of an evaluation-mode
      forward pass (``cut=-1``) of the step's parameters; used for ``mono_losses``.
    loss_grads: the per-loss gradients when the step computed them with its own
      gradient (None: computed from ``outputs`` when needed).
  """

  outputs: Callable[[Any], tuple[jax.Array, jax.Array]]
  logits: jax.Array
  branch_logits: jax.Array
  labels: jax.Array
  value: jax.Array
  evaluate: Callable[[Any], tuple[jax.Array, jax.Array]] | None = None
  intermediates: Any = dataclasses.field(default_factory=dict)
  inputs: tuple | None = None
  evaluate_on: Callable[[tuple], tuple[jax.Array, jax.Array]] | None = None
  loss_grads: Any = None


def _loss_grads(params, step: StepPass):
  if step.loss_grads is not None:
    return step.loss_grads
  losses = lambda p: mean_cross_entropies(*step.outputs(p), step.labels)
  values, pullback = jax.vjp(losses, params)
  return pullback_each(pullback, values)


def pullback_each(pullback: Callable, values: jax.Array) -> Any:
  """The gradient of each of ``values``' entries, stacked on a leading axis: one backward
  pass per entry, unrolled (``jax.vmap`` over the cotangents ran XLA:CPU's convolution
  gradients about 2x slower than these separate passes: benchmarks/RESULTS.md)."""
  rows = jnp.eye(values.shape[0], dtype=values.dtype)
  grads = [pullback(row)[0] for row in rows]
  return jax.tree.map(lambda *g: jnp.stack(g), *grads)


def _mono_logits(params, step: StepPass):
  del params
  if step.evaluate is None:
    raise ValueError("mono_logits needs StepPass.evaluate (an evaluation-mode forward pass "
                     "of a given cut).")
  n = step.branch_logits.shape[0]
  return jnp.stack([step.evaluate(jnp.asarray(k, jnp.int32))[1][k] for k in range(n)])


def _features(params, step: StepPass):
  del params
  features = tuple(step.intermediates.get("features", ()))
  n = step.branch_logits.shape[0]
  if len(features) != n:
    raise ValueError(f"features: the model sowed {len(features)} 'features' into its "
                     f"'intermediates' collection; expected one per branch ({n}): call "
                     "self.sow('intermediates', 'features', h) once per branch, in branch "
                     "order, in the model's top-level __call__.")
  return features


def _mono_losses(params, step: StepPass):
  del params
  if step.evaluate_on is None or step.inputs is None:
    raise ValueError("mono_losses needs StepPass.inputs and StepPass.evaluate_on (an "
                     "evaluation-mode forward pass, cut=-1, on given inputs).")
  from gml_jax.agm import shapley_losses  # the rule's module owns the Shapley combination

  return shapley_losses(lambda inputs: step.evaluate_on(inputs)[0], step.inputs, step.labels)


COMPUTE = {
    "scores": lambda params, step: true_class_scores(step.branch_logits, step.labels),
    "value": lambda params, step: step.value,
    "loss_grads": _loss_grads,
    "mono_logits": _mono_logits,
    "features": _features,
    "label": lambda params, step: step.labels,
    "mono_losses": _mono_losses,
}


def extra_args(needs: tuple[str, ...], params: Any, step: StepPass) -> dict:
  """The keyword arguments of ``tx.update`` that ``needs`` (:func:`needs_of`) names,
  computed from the step's forward pass ``step``; {} when nothing is needed."""
  return {name: COMPUTE[name](params, step) for name in needs}
