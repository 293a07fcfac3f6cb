r"""PMR: prototypical modal rebalance (Fan, Xu, Wang, Wang, Guo, CVPR 2023).

Per modality k and class c a **prototype** :math:`p^k_c`, the mean feature of class c's
training examples under branch k's encoder, recomputed before every epoch by a pass over
training data (optionally an exponential moving average over epochs). On a batch with
features :math:`f^k_i` and labels :math:`y_i`:

.. math::

   \ell^k_{ic} = -\lVert f^k_i - p^k_c \rVert_2, \qquad
   s_k = \sum_i \mathrm{softmax}(\ell^k_i)_{y_i}, \qquad
   \rho_k = s_k \,/\, \mathrm{mean}_{j \ne k}\, s_j,

and the loss gains :math:`\sum_k \beta_k\, \mathrm{PCE}_k` with the prototypical
cross-entropy :math:`\mathrm{PCE}_k = \mathrm{mean}_i\, \mathrm{CE}(\ell^k_i, y_i)` and
:math:`\beta_k = \alpha` for a slow modality (:math:`\rho_k < 1`; for two modalities the one
whose prototype score is lower), 0 otherwise (``rule="authors"``), or
:math:`\beta_k = \alpha \min(1, 1/\rho_k - 1)` (``rule="clipped"``, BalanceBenchmark's).
With ``entropy`` μ > 0, every fast modality j (ρ_j > 1) also gets
:math:`-\mu\, \max_k (\beta_k / \alpha)\, \mathrm{mean}_i H(\mathrm{softmax}(\ell^j_i))`
(the paper's prototypical entropy regularisation) during the first ``entropy_epochs``
epochs of the window. The scores, ratios and coefficients carry no gradient; PCE and the
entropy do, through the features only (prototypes are constants of the epoch).

``docs/methods/pmr.md`` compares this with the paper, the authors' code and
BalanceBenchmark, point by point.

PMR changes the loss, so it is not a pure gradient transformation. It comes in pieces that
the library's step and a hand-written step both use:

* :func:`pmr` wraps an optimizer; its state (:class:`PMRState`) holds the prototypes and
  the configuration, reports the scores, ratios and coefficients of each step
  (``train_metrics``) and passes the gradients to the inner optimizer unchanged;
* :meth:`PMRState.loss_term` (or :func:`pmr_loss`), the term to add to the loss inside the
  differentiated function, from the step's features and labels;
* :func:`prototype_sums` / :func:`make_prototype_step` / :func:`prototype_pass`, the data
  pass, and :meth:`PMRState.epoch_start` (through :func:`gml_jax.epochs.epoch_start`), which
  installs the prototypes before each epoch.

Features: a Linen model sows its branches' pooled features [B, D_k] into
``("intermediates", "features")``, once per branch in branch order (the ``features`` of
:mod:`gml_jax.extras`; :class:`gml_jax.FusionNetwork` does); apply it with
``mutable=["intermediates"]`` and read them with :func:`sown_features`. Any other model can
pass its features to these pure functions directly.

A hand-written step::

  def loss_fn(params):
    (logits, branch_logits), inter = model.apply({"params": params, ...}, inputs,
                                                 train=True, mutable=["intermediates"])
    features = gml_jax.pmr.sown_features(inter["intermediates"])
    value = ce(logits, label) + pmr_state.loss_term(features=features, label=label)
    return value, features
  grads, features = jax.grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params, features=features, label=label)

Composition: ``pmr`` only records; wrap any optimizer (momentum, Adam) and, if wanted,
another balancing transform inside it. N >= 2 modalities; for N = 2 the rule is exactly
the authors' (ρ_0 = s_0 / s_1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from gml_jax.balancing import find_state
from gml_jax.modulation import discrepancy_ratios
from gml_jax.protocol import as_functional

FEATURES = "features"
"""The name under which a model sows its branches' features into ``intermediates``."""
RULES = ("authors", "clipped")
SELECTS = ("slow", "all")
DISTANCE_FLOOR = 1e-12  # squared distance below which the distance's gradient is 0, not NaN
ABSENT_LOGIT = -1e30  # the logit of a class without a prototype: probability 0, and no NaN


class PrototypeSums(NamedTuple):
  """Per-class sums of features over a data pass; add two with :func:`add_prototype_sums`.

  Attributes:
    sums: N arrays float32[C, D_k], modality k's summed features of each class.
    counts: float32[C], the examples of each class that were summed.
  """

  sums: tuple
  counts: jax.Array


def _check_features(features, caller: str, n: int | None = None) -> tuple:
  if not isinstance(features, (tuple, list)) or not features or not all(
      hasattr(f, "shape") and jnp.ndim(f) == 2 for f in features):
    shapes = ([getattr(f, "shape", None) for f in features]
              if isinstance(features, (tuple, list)) else "")
    raise ValueError(f"{caller}: features must be a tuple of N arrays [B, D_k], one per "
                     f"modality; got {type(features).__name__} {shapes}.")
  batch = {jnp.shape(f)[0] for f in features}
  if len(batch) != 1:
    raise ValueError(f"{caller}: every modality's features need the same batch size; got "
                     f"{[jnp.shape(f) for f in features]}.")
  if n is not None and len(features) != n:
    raise ValueError(f"{caller}: expected features of {n} modalities, got {len(features)}.")
  return tuple(jnp.asarray(f, jnp.float32) for f in features)


def _check_label(label, batch: int, caller: str) -> jax.Array:
  if jnp.shape(label) != (batch,) or not jnp.issubdtype(jnp.result_type(label), jnp.integer):
    raise ValueError(f"{caller}: label must be int[B] with B = {batch}; got "
                     f"{jnp.result_type(label)} {jnp.shape(label)}.")
  return jnp.asarray(label)


def prototype_sums(features: Sequence[jax.Array], label: jax.Array, num_classes: int,
                   mask: jax.Array | None = None) -> PrototypeSums:
  """The per-class feature sums and counts of one batch.

  Args:
    features: N arrays [B, D_k], each modality's features of the batch.
    label: int[B], the classes (in [0, num_classes)).
    num_classes: C.
    mask: float[B] or None: 0 for padding examples, which are not counted.
  """
  features = _check_features(features, "prototype_sums")
  label = _check_label(label, jnp.shape(features[0])[0], "prototype_sums")
  onehot = jax.nn.one_hot(label, num_classes, dtype=jnp.float32)
  if mask is not None:
    onehot = onehot * jnp.asarray(mask, jnp.float32)[:, None]
  return PrototypeSums(sums=tuple(onehot.T @ f for f in features),
                       counts=jnp.sum(onehot, axis=0))


def add_prototype_sums(a: PrototypeSums, b: PrototypeSums) -> PrototypeSums:
  """The sums of two passes (or batches) together."""
  return jax.tree.map(jnp.add, a, b)


def sown_features(intermediates: Any) -> tuple:
  """The features a model sowed under :data:`FEATURES` in its ``intermediates`` collection,
  one sow per branch in branch order: a tuple of N arrays [B, D_k] (as
  :mod:`gml_jax.extras` reads them)."""
  node = intermediates.get(FEATURES) if hasattr(intermediates, "get") else None
  if node is None:
    raise ValueError(
        "PMR needs the model's per-modality features: sow them in __call__ with "
        f"self.sow('intermediates', {FEATURES!r}, f_k) once per branch, in branch order "
        "(pooled features [B, D_k]), and apply the model with mutable=['intermediates'].")
  return tuple(node)


def make_prototype_step(model: Any, num_classes: int) -> Callable[[Any, dict], PrototypeSums]:
  """``(variables, batch) -> PrototypeSums``: one batch of the prototype pass, the model in
  evaluation mode (BatchNorm running statistics; as the authors' ``model.eval()``), its
  features read from what it sows (:func:`sown_features`). Compile it with ``jax.jit`` (or
  :func:`gml_jax.compile_eval_step`-style sharding). A Linen model (or anything with
  ``apply`` that sows)."""
  model = as_functional(model)

  def step(variables, batch: dict) -> PrototypeSums:
    _, state = model.apply(variables, tuple(batch["inputs"]), train=False,
                           mutable=["intermediates"])
    return prototype_sums(sown_features(state["intermediates"]), batch["label"], num_classes,
                          batch.get("mask"))

  return step


def prototype_pass(step: Callable, variables: Any, batches: Iterable[dict]) -> PrototypeSums:
  """The sums of ``step`` (:func:`make_prototype_step`) over ``batches``: what
  :func:`gml_jax.epochs.epoch_start` takes as ``prototype_sums``. The authors use the first
  tenth of a shuffled pass over the training split (``len(loader) // 10`` batches)."""
  total = None
  for batch in batches:
    sums = step(variables, batch)
    total = sums if total is None else add_prototype_sums(total, sums)
  if total is None:
    raise ValueError("prototype_pass: no batches.")
  return total


def feature_dims(model: Any, variables: Any, example_inputs: Sequence[jax.Array]) -> tuple:
  """D_k of every modality's sown features, traced abstractly (nothing is computed)."""
  model = as_functional(model)
  shapes = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"])[1],
      variables, tuple(example_inputs))
  return tuple(int(f.shape[-1]) for f in sown_features(shapes["intermediates"]))


# --------------------------------------------------------------------------------------
# The rule


def prototype_logits(features: jax.Array, prototypes: jax.Array, valid: jax.Array) -> jax.Array:
  """ℓ = −‖f_i − p_c‖₂, float32[B, C]; classes without a prototype (``valid`` False) get
  :data:`ABSENT_LOGIT` (probability 0; finite, so that no gradient is NaN). The distance's
  gradient is 0 (not NaN) where a feature sits on a prototype."""
  sq = jnp.sum(jnp.square(features[:, None, :] - prototypes[None, :, :]), axis=-1)
  distance = jnp.sqrt(jnp.maximum(sq, DISTANCE_FLOOR))
  return jnp.where(valid[None, :], -distance, ABSENT_LOGIT)


def _per_modality(features, label, prototypes, valid, weight):
  """Per modality: the summed true-class probability, PCE (mean over counted examples) and
  the mean entropy of the prototype softmax. ``weight``: float[B], the counted examples."""
  count = jnp.maximum(jnp.sum(weight), 1.0)
  scores, pce, entropy = [], [], []
  for f, p in zip(features, prototypes):
    logits = prototype_logits(f, p, valid)
    logp = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.where(valid[None, :], logp, 0.0)  # absent classes out of the sums
    true = jnp.take_along_axis(logp, label[:, None], axis=-1)[:, 0]
    probs = jnp.exp(logp) * valid[None, :]
    scores.append(jnp.sum(weight * jnp.exp(true)))
    pce.append(jnp.sum(weight * -true) / count)
    entropy.append(jnp.sum(weight * -jnp.sum(probs * logp, axis=-1)) / count)
  return jnp.stack(scores), jnp.stack(pce), jnp.stack(entropy)


def pmr_coefficients(scores: jax.Array, rule: str = "authors",
                     select: str = "slow") -> tuple[jax.Array, jax.Array]:
  """(ρ, c): the ratios ρ_k = s_k / mean_{j≠k} s_j and the coefficients c_k ∈ [0, 1] of
  the PCE terms before α. ``rule="authors"``: c_k = 1 where ρ_k < 1, else 0 (equal scores:
  nobody); ``"clipped"``: c_k = min(1, 1/ρ_k − 1) where ρ_k < 1 (ρ_k = 0: 1).
  ``select="all"``: c_k = 1 for every modality (a control without PMR's decision)."""
  ratios = discrepancy_ratios(scores)
  slow = ratios < 1.0
  if rule == "authors":
    c = slow.astype(jnp.float32)
  else:
    inverse = jnp.where(ratios > 0, 1.0 / jnp.where(ratios > 0, ratios, 1.0), jnp.inf)
    c = jnp.where(slow, jnp.clip(inverse - 1.0, 0.0, 1.0), 0.0)
  if select == "all":
    c = jnp.ones_like(c)
  return ratios, c


class PMRStats(NamedTuple):
  """What one batch gives: per modality the prototype score s_k, ratio ρ_k, PCE
  coefficient β_k (α included, 0 outside the window), entropy weight e_k (μ included),
  PCE_k and mean entropy H_k; ``loss`` = Σ β_k PCE_k − Σ e_k H_k."""

  scores: jax.Array
  ratios: jax.Array
  coefficients: jax.Array
  entropy_weights: jax.Array
  pce: jax.Array
  entropy: jax.Array
  loss: jax.Array


def pmr_loss(features: Sequence[jax.Array], label: jax.Array, prototypes: Sequence[jax.Array],
             valid: jax.Array, *, alpha: float, rule: str = "authors", select: str = "slow",
             entropy: float = 0.0, active: Any = True, entropy_active: Any = True,
             mask: jax.Array | None = None) -> PMRStats:
  """PMR's added loss on one batch (see the module doc for the math), as a pure function.

  Examples whose class has no prototype (``valid`` False), and those with ``mask`` 0,
  count in nothing. Differentiable in ``features``; the coefficients are constants.

  Args:
    features: N arrays [B, D_k] from this step's forward pass (training mode).
    label: int[B].
    prototypes: N arrays [C, D_k].
    valid: bool[C], the classes that have a prototype.
    alpha: α >= 0, the PCE weight of a slow modality.
    rule, select: see :func:`pmr_coefficients`.
    entropy: μ >= 0, the weight of the fast modalities' entropy term.
    active: bool, the PMR window (False: every coefficient 0).
    entropy_active: bool, the entropy term's window.
    mask: float[B] or None.
  """
  features = _check_features(features, "pmr_loss", len(prototypes))
  label = _check_label(label, jnp.shape(features[0])[0], "pmr_loss")
  valid = jnp.asarray(valid, bool)
  weight = valid[label].astype(jnp.float32)
  if mask is not None:
    weight = weight * jnp.asarray(mask, jnp.float32)
  scores, pce, ent = _per_modality(features, label, prototypes, valid, weight)
  scores = jax.lax.stop_gradient(scores)
  ratios, c = pmr_coefficients(scores, rule, select)
  on = jnp.asarray(active, bool) & jnp.any(valid) & (jnp.sum(weight) > 0)
  coefficients = jnp.where(on, alpha * c, 0.0)
  fast = ratios > 1.0
  entropy_weights = jnp.where(on & jnp.asarray(entropy_active, bool) & fast,
                              entropy * jnp.max(c), 0.0)
  loss = jnp.sum(coefficients * pce) - jnp.sum(entropy_weights * ent)
  return PMRStats(scores, ratios, coefficients, entropy_weights, pce, ent, loss)


# --------------------------------------------------------------------------------------
# The transform and its state


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class PMRConfig:
  """PMR's hyper-parameters (static: part of the state's structure, not of its arrays)."""

  alpha: float
  momentum: float
  epochs: tuple[int, int] | None
  rule: str
  select: str
  entropy: float
  entropy_epochs: int


class PMRState(NamedTuple):
  """State of :func:`pmr` (N modalities, C classes).

  Attributes:
    epochs_started: int32, epoch hooks run so far (the current epoch is this − 1).
    prototypes: N arrays float32[C, D_k].
    valid: bool[C], the classes with a prototype (seen in some pass).
    active: bool, whether this epoch is in the PMR window.
    entropy_active: bool, whether this epoch is in the entropy term's window.
    scores, ratios, coefficients, entropy_weights: float32[N], the last step's
      (:class:`PMRStats`).
    config: :class:`PMRConfig` (static).
    inner_state: state of the wrapped optimizer.
  """

  epochs_started: jax.Array
  prototypes: tuple
  valid: jax.Array
  active: jax.Array
  entropy_active: jax.Array
  scores: jax.Array
  ratios: jax.Array
  coefficients: jax.Array
  entropy_weights: jax.Array
  config: PMRConfig
  inner_state: Any

  NEEDS = ("features", "label")  # noqa: RUF012 (the step protocol's class attributes)
  LOSS_NEEDS = ("features", "label")
  EPOCH_NEEDS = ("prototype_sums",)
  METRICS = {"pmr_score": "pmr_score_{m}", "pmr_ratio": "pmr_ratio_{m}",  # noqa: RUF012
             "pmr_coefficient": "pmr_coefficient_{m}",
             "pmr_entropy_weight": "pmr_entropy_weight_{m}"}

  def train_metrics(self) -> dict:
    """The last step's prototype scores, ratios, PCE coefficients and entropy weights."""
    return {"pmr_score": self.scores, "pmr_ratio": self.ratios,
            "pmr_coefficient": self.coefficients, "pmr_entropy_weight": self.entropy_weights}

  def stats(self, *, features, label, mask=None) -> PMRStats:
    """:func:`pmr_loss` with this state's prototypes, window and configuration."""
    c = self.config
    return pmr_loss(features, label, self.prototypes, self.valid, alpha=c.alpha, rule=c.rule,
                    select=c.select, entropy=c.entropy, active=self.active,
                    entropy_active=self.entropy_active, mask=mask)

  def loss_term(self, *, features, label, mask=None) -> jax.Array:
    """The scalar to add to the loss inside the differentiated function."""
    return self.stats(features=features, label=label, mask=mask).loss

  def epoch_start(self, *, prototype_sums: PrototypeSums) -> "PMRState":
    """The state for the epoch about to begin: prototypes from this epoch-start pass
    (class means; from the second epoch on, (1 − m)·new + m·previous with m the
    momentum), a class absent from the pass keeping its previous prototype; the windows of
    this epoch."""
    c = self.config
    if len(prototype_sums.sums) != len(self.prototypes) or any(
        s.shape != p.shape for s, p in zip(prototype_sums.sums, self.prototypes)):
      raise ValueError("PMR epoch_start: prototype_sums have shapes "
                       f"{[s.shape for s in prototype_sums.sums]}, the state's prototypes "
                       f"{[p.shape for p in self.prototypes]} ([num_classes, D_k]).")
    epoch = self.epochs_started
    seen = prototype_sums.counts > 0
    count = jnp.where(seen, prototype_sums.counts, 1.0)[:, None]
    blend = (epoch > 0) & self.valid  # per class: an earlier prototype to average with
    prototypes = []
    for s, old in zip(prototype_sums.sums, self.prototypes):
      new = s / count
      new = jnp.where(blend[:, None], (1.0 - c.momentum) * new + c.momentum * old, new)
      prototypes.append(jnp.where(seen[:, None], new, old))
    start, stop = c.epochs if c.epochs is not None else (0, None)
    active = epoch >= start
    if stop is not None:
      active = active & (epoch <= stop)
    entropy_active = active & (epoch <= start + c.entropy_epochs - 1)
    return self._replace(epochs_started=epoch + 1, prototypes=tuple(prototypes),
                         valid=self.valid | seen, active=active, entropy_active=entropy_active)


def _check_epochs(epochs) -> None:
  if epochs is None:
    return
  if (not isinstance(epochs, (tuple, list)) or len(epochs) != 2
      or not all(isinstance(v, int) and not isinstance(v, bool) for v in epochs)
      or not 0 <= epochs[0] <= epochs[1]):
    raise ValueError("pmr: epochs must be None (every epoch) or (first, last), epoch indices "
                     f"with 0 <= first <= last, both included; got {epochs!r}.")


def pmr(
    inner: optax.GradientTransformation,
    *,
    num_classes: int,
    feature_dims: Sequence[int],
    alpha: float,
    momentum: float = 0.0,
    epochs: tuple[int, int] | None = None,
    rule: str = "authors",
    select: str = "slow",
    entropy: float = 0.0,
    entropy_epochs: int = 10,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer with PMR's state (Fan et al., CVPR 2023); the loss term comes from
  the state (:meth:`PMRState.loss_term`), the prototypes from the epoch hook.

  ``update(grads, state, params, *, features, label)`` records the batch's prototype
  scores, ratios and coefficients (:class:`PMRStats`, from the same features the loss term
  saw) and hands ``grads`` to ``inner`` unchanged. Until the first
  :func:`gml_jax.epochs.epoch_start` no class has a prototype and the term is 0.

  Example (two modalities, two classes; modality 1's features sit farther from their
  prototypes, so it is the slow one and alone gets α·PCE)::

    >>> import jax.numpy as jnp, optax
    >>> from gml_jax import epochs, pmr
    >>> tx = pmr.pmr(optax.sgd(0.1), num_classes=2, feature_dims=(1, 1), alpha=2.0)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> sums = pmr.PrototypeSums((jnp.array([[0.0], [4.0]]), jnp.array([[0.0], [1.0]])),
    ...                          jnp.array([1.0, 1.0]))
    >>> state = epochs.epoch_start(state, prototype_sums=sums)
    >>> features = (jnp.array([[0.0], [4.0]]), jnp.array([[0.4], [0.6]]))
    >>> stats = state.stats(features=features, label=jnp.array([0, 1]))
    >>> [round(float(c), 3) for c in stats.coefficients]
    [0.0, 2.0]

  Args:
    inner: the optimizer to wrap.
    num_classes: C.
    feature_dims: D_k of every modality's features (N >= 2 of them;
      :func:`feature_dims` measures a model's).
    alpha: α >= 0, the PCE weight of the slow modality.
    momentum: m ∈ [0, 1), the prototypes' moving average over epochs (authors' scripts 0;
      BalanceBenchmark 0.2).
    epochs: ``(first, last)`` epoch indices (0-based, both included) in which PMR acts, as
      the authors' ``modulation_starts``/``modulation_ends``; None: every epoch.
    rule: ``"authors"`` (β = α for the slow modality) or ``"clipped"`` (BalanceBenchmark's
      α · min(1, 1/ρ − 1)).
    select: ``"slow"`` (PMR) or ``"all"`` (every modality's PCE at α: a control).
    entropy: μ >= 0, the fast modality's prototype-entropy term (0: off, as in the
      authors' code).
    entropy_epochs: how many epochs from the window's first the entropy term acts.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`PMRState`.

  References:
    Fan et al., CVPR 2023, https://arxiv.org/abs/2211.07089
  """
  dims = tuple(feature_dims) if isinstance(feature_dims, (tuple, list)) else None
  if dims is None or len(dims) < 2 or not all(
      isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
    raise ValueError(f"pmr: feature_dims must list D_k > 0 of N >= 2 modalities; got "
                     f"{feature_dims!r}.")
  if not (isinstance(num_classes, int) and num_classes >= 2):
    raise ValueError(f"pmr: num_classes must be an int >= 2, got {num_classes!r}.")
  if not alpha >= 0:
    raise ValueError(f"pmr: alpha must be a number >= 0, got {alpha!r}.")
  if not 0 <= momentum < 1:
    raise ValueError(f"pmr: momentum must be in [0, 1), got {momentum!r}.")
  if rule not in RULES:
    raise ValueError(f"pmr: rule must be one of {RULES}, got {rule!r}.")
  if select not in SELECTS:
    raise ValueError(f"pmr: select must be one of {SELECTS}, got {select!r}.")
  if not entropy >= 0 or not (isinstance(entropy_epochs, int) and entropy_epochs >= 0):
    raise ValueError(f"pmr: entropy must be >= 0 and entropy_epochs an int >= 0; got "
                     f"{entropy!r}, {entropy_epochs!r}.")
  _check_epochs(epochs)
  config = PMRConfig(float(alpha), float(momentum), tuple(epochs) if epochs else None, rule,
                     select, float(entropy), entropy_epochs)
  inner = optax.with_extra_args_support(inner)
  n = len(dims)

  def init_fn(params):
    ones = jnp.ones((n,), jnp.float32)
    return PMRState(
        epochs_started=jnp.zeros((), jnp.int32),
        prototypes=tuple(jnp.zeros((num_classes, d), jnp.float32) for d in dims),
        valid=jnp.zeros((num_classes,), bool), active=jnp.zeros((), bool),
        entropy_active=jnp.zeros((), bool), scores=jnp.zeros((n,), jnp.float32), ratios=ones,
        coefficients=jnp.zeros((n,), jnp.float32), entropy_weights=jnp.zeros((n,), jnp.float32),
        config=config, inner_state=inner.init(params))

  def update_fn(updates, state: PMRState, params=None, *, features=None, label=None,
                **extra_args):
    if features is None or label is None:
      raise ValueError("pmr needs this step's features and labels: tx.update(grads, state, "
                       "params, features=(f_0, ..., f_(N-1)), label=int[B]) (features: "
                       "gml_jax.pmr.sown_features).")
    stats = jax.lax.stop_gradient(state.stats(features=features, label=label))
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    return inner_updates, state._replace(
        scores=stats.scores, ratios=stats.ratios, coefficients=stats.coefficients,
        entropy_weights=stats.entropy_weights, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def pmr_state(opt_state: Any) -> PMRState | None:
  """The :class:`PMRState` inside an optimizer state, or None if there is none."""
  return find_state(opt_state, PMRState, "pmr")
