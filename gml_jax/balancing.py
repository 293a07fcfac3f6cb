"""The balancing optax transform: conditional learning speed and re-balancing steps.

Implements §2 and §3 of the algorithm of Wu et al., "Characterizing and Overcoming the
Greedy Nature of Learning in Multi-modal Deep Neural Networks" (ICML 2022), as one optax
gradient transformation that wraps any optimizer. Everything runs inside the compiled
update: no host syncs, and switching between normal and re-balancing steps never retraces
(the mode is a traced int32 in the state).

Parameter groups are given by a label tree with the structure of the parameters
(``main:<k>``, ``fusion:<k>``, ``fusion:shared``, ``other``: see :mod:`gml_jax.labels`, whose
:func:`gml_jax.label_rules` builds one from rules over parameter paths).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gml_jax.labels import Labels, num_modalities, path_string, resolve_labels

METHODS = ("vanilla", "random", "guided", "fixed")
"""The values of :func:`balanced_multimodal`'s ``method``: normal steps only, random
re-balancing steps, the paper's guided re-balancing, or guided's schedule with a pinned
target and no speed test (a control for guided's decision)."""
UPDATE_MODES = ("branch", "all")
"""The values of ``update``: move only main_k in a re-balancing step for k (the paper), or
everything but the fusion heads into φ_k (the authors' code)."""
NORMAL_STEP = -1
"""The re-balancing target of a normal step."""
TINY_PARAMETERS = 1e-6
"""A group whose ‖θ‖² is below this share of the largest group's is reported by
:func:`speed_warnings`: its μ = ‖g‖²/‖θ‖² is dominated by the near-zero denominator."""


class BalanceState(NamedTuple):
  """State of :func:`balanced_multimodal` (all fields are arrays; N = number of modalities).

  Attributes:
    step: int32, number of updates taken so far, i.e. the index of the coming step.
    target: int32, modality that the coming step re-balances; -1 for a normal step.
    window_left: int32, re-balancing steps left in the current window, the coming one
      included (0 outside a window).
    mu_main: float32[N], μ of each main group at the last step.
    mu_fusion: float32[N], μ of each fusion group at the last step.
    param_sq_main: float32[N], ‖θ‖² of each main group at the last step (the denominator
      of μ; see :func:`speed_warnings`).
    param_sq_fusion: float32[N], likewise for each fusion group.
    accum_main: float32[N], M of each main group: sum of μ over warm-up and normal steps
      (the float32 running sum; M = accum_main + accum_main_low).
    accum_fusion: float32[N], M of each fusion group, likewise.
    accum_main_low: float32[N], the rounding error of ``accum_main`` (compensated
      summation: M stays exact to float32 precision over any number of steps).
    accum_fusion_low: float32[N], likewise for ``accum_fusion``.
    rebalance_steps: int32[N], re-balancing steps taken so far for each modality.
    update_all: bool, True for ``update="all"``; kept here so that a train step can mask
      model state (BatchNorm statistics) with :func:`update_mask` the same way.
    inner_state: state of the wrapped optimizer.
  """

  step: jax.Array
  target: jax.Array
  window_left: jax.Array
  mu_main: jax.Array
  mu_fusion: jax.Array
  param_sq_main: jax.Array
  param_sq_fusion: jax.Array
  accum_main: jax.Array
  accum_fusion: jax.Array
  accum_main_low: jax.Array
  accum_fusion_low: jax.Array
  rebalance_steps: jax.Array
  update_all: jax.Array
  inner_state: Any

  # The step protocol (gml_jax.extras): nothing beyond the gradients; these metrics.
  NEEDS = ()
  METRICS = {"speeds": "s_{m}", "mu_main": "mu_main_{m}", "mu_fusion": "mu_fusion_{m}",
             "d_speed": "d_speed"}

  def train_metrics(self) -> dict:
    """What a train step reports of this state: μ per group, the speeds s_k and d_speed
    (NaN while undefined)."""
    speeds = speeds_from_accumulators(*accumulated(self))
    return {"mu_main": self.mu_main, "mu_fusion": self.mu_fusion, "speeds": speeds,
            "d_speed": speed_gap(speeds)}


# --------------------------------------------------------------------------------------
# Masks


def _leaf_moves(kind: str, k: int | None, target: jax.Array, update_all: jax.Array):
  """Whether a leaf of this group may change in a step whose re-balancing target is
  ``target`` (-1: normal step). "branch": only main_k; "all": all but φ_k's fusion head."""
  normal = target < 0
  if kind == "main":
    return normal | update_all | (target == k)
  if kind == "fusion":
    return normal | (update_all & (target != k))
  return normal | update_all


def _masks(parsed, target, update_all) -> list[jax.Array]:
  return [_leaf_moves(kind, k, target, update_all) for kind, k in parsed]


# --------------------------------------------------------------------------------------
# Conditional learning speed


def _group_sums(leaves: Sequence[jax.Array], parsed, n: int) -> tuple[jax.Array, jax.Array]:
  """Σ ||x||² per main group and per fusion group (shared leaves count for every k)."""
  main = [jnp.zeros((), jnp.float32) for _ in range(n)]
  own = [jnp.zeros((), jnp.float32) for _ in range(n)]
  shared = jnp.zeros((), jnp.float32)
  for x, (kind, k) in zip(leaves, parsed):
    sq = jnp.sum(jnp.square(jnp.asarray(x, jnp.float32)))
    if kind == "main":
      main[k] = main[k] + sq
    elif kind == "fusion":
      own[k] = own[k] + sq
    elif kind == "shared":
      shared = shared + sq
  return jnp.stack(main), jnp.stack(own) + shared


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _compensated_add(high: jax.Array, low: jax.Array, x: jax.Array):
  """(high, low) + x with the rounding error of the sum kept in ``low`` (Knuth's TwoSum):
  high + low stays the exact sum to float32 precision, where a plain float32 sum of 10⁵
  decaying terms drifts by ~1e-3 relative."""
  total = high + x
  back = total - high
  error = (high - (total - back)) + (x - back)
  return total, low + error


def accumulated(state: "BalanceState") -> tuple[jax.Array, jax.Array]:
  """M of every main and fusion group: float32[N] each."""
  return state.accum_main + state.accum_main_low, state.accum_fusion + state.accum_fusion_low


def speeds_from_accumulators(accum_main: jax.Array, accum_fusion: jax.Array) -> jax.Array:
  """s_k = log10(M_fusion_k / M_main_k); undefined (NaN) while either sum is still zero,
  e.g. before the first step or for a group that has never had a gradient. An undefined
  d_speed never starts a re-balancing window."""
  valid = (accum_main > 0) & (accum_fusion > 0)
  safe = lambda x: jnp.where(valid, x, 1.0)
  return jnp.where(valid, jnp.log10(safe(accum_fusion) / safe(accum_main)), jnp.nan)


def speed_gap(speeds: jax.Array) -> jax.Array:
  """d_speed = s_0 - s_1 for two modalities; the spread max_k s_k - min_k s_k for more."""
  if speeds.shape[-1] == 2:
    return speeds[..., 0] - speeds[..., 1]
  return jnp.max(speeds, axis=-1) - jnp.min(speeds, axis=-1)


# --------------------------------------------------------------------------------------
# Keeping the optimizer state of frozen parameters


def _select_param_state(moves: list[jax.Array], param_def, new_state, old_state):
  """Inner-optimizer state with the entries of frozen parameters restored.

  Param-shaped parts of the state (momentum, Adam moments: subtrees laid out like the
  parameters) keep their old value for the leaves that do not move, so a re-balancing step
  leaves no trace on them; other parts (step counts, hyperparameters) advance as usual.
  They are found by their layout rather than by ``optax.tree_utils.tree_map_params``,
  whose placeholder parameters would break transforms that read the parameters' labels in
  ``init`` (such as :func:`gml_jax.ogm_ge`).
  """
  laid_out_like_params = lambda x: jax.tree.structure(x) == param_def

  def select(new, old):
    if not laid_out_like_params(new):
      return new
    return jax.tree.unflatten(param_def, [
        jnp.where(m, n, o) for m, n, o in zip(moves, jax.tree.leaves(new), jax.tree.leaves(old))])

  return jax.tree.map(select, new_state, old_state, is_leaf=laid_out_like_params)


# --------------------------------------------------------------------------------------
# What the transform refuses


def _check_static(**values) -> None:
  """The numeric options are Python numbers: they shape the state machine when the
  transform is built. ``optax.inject_hyperparams(balanced_multimodal)`` passes arrays
  (tracers inside ``jit``) and would fail with a raw ``TracerBoolConversionError``."""
  arrays = [name for name, v in values.items() if isinstance(v, (jax.Array, np.ndarray))]
  if arrays:
    raise TypeError(
        f"balanced_multimodal's {', '.join(arrays)} must be Python numbers, fixed when the "
        "transform is built; got arrays (is balanced_multimodal wrapped in "
        "optax.inject_hyperparams?). To change the learning rate (or any optimizer "
        "hyperparameter) during a run, inject it into the inner optimizer instead: "
        "balanced_multimodal(optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3), "
        "labels), then opt_state = gml_jax.set_hyperparams(opt_state, learning_rate=...).")


_ACCUMULATING = ("MultiStepsState", "ApplyEvery")


def _accumulating(tree: Any) -> list[str]:
  """The gradient accumulations (``optax.MultiSteps``, its state, ``apply_every``'s) in
  ``tree``, by type name."""
  found = []

  def visit(node) -> bool:
    if type(node).__name__ in _ACCUMULATING or isinstance(node, optax.MultiSteps):
      found.append(type(node).__name__)
    return False

  jax.tree.leaves(tree, is_leaf=visit)
  return found


def _check_not_accumulating(tree: Any) -> None:
  """Refuses an inner optimizer (or its state) that does not apply every update: inside the
  transform, ``optax.MultiSteps`` sums masked and unmasked gradients over steps of
  different modes and emits them on its own schedule."""
  found = _accumulating(tree)
  if found:
    raise ValueError(
        f"balanced_multimodal wraps an optimizer that does not apply every update "
        f"({found[0]}: gradient accumulation). Inside the transform it mixes the gradients of "
        "normal and re-balancing steps, and branches stop moving. Put the accumulation "
        "around the transform instead: optax.MultiSteps(balanced_multimodal(inner, labels), "
        "every_k_schedule=k).")


# --------------------------------------------------------------------------------------
# The transform


def balanced_multimodal(
    inner: optax.GradientTransformation,
    labels: Labels,
    *,
    method: str = "guided",
    alpha: float = 0.01,
    window: int = 5,
    warmup_steps: int = 0,
    update: str = "branch",
    seed: int = 0,
    target: int = 0,
    shares: Sequence[float] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer with balanced multi-modal learning (Wu et al., ICML 2022).

  At every step t it measures, from the raw mini-batch gradient g and the parameters p
  before the update, the learning speed of each parameter group G

  .. math::  \mu_G(t) = \sum_{p \in G} \|g_p\|^2 \,/\, \sum_{p \in G} \|p\|^2,

  accumulates :math:`M_G = \sum_\tau \mu_G(\tau)` over warm-up and normal steps, and derives
  the conditional learning speed of modality k,
  :math:`s_k = \log_{10}(M_{fusion_k} / M_{main_k})`, and
  :math:`d_{speed} = s_0 - s_1` (for N > 2 modalities the spread
  :math:`\max_k s_k - \min_k s_k`).

  ``method="guided"``: after ``warmup_steps`` steps, a normal step with
  :math:`|d_{speed}| > \alpha` is followed by ``window`` re-balancing steps for the modality
  with the largest speed. ``method="random"``: after warm-up every step is drawn uniformly
  from {normal, re-balance modality 0, ..., N-1} (reproducible from ``seed``).
  ``method="vanilla"``: normal steps only (speeds are still measured).

  **N > 2 modalities** (``docs/tutorials/n_modalities.md``): d_speed is the spread
  :math:`\max_k s_k - \min_k s_k`, never negative; guided compares it with α and, when it
  is larger, re-balances the modality with the largest s_k (ties: the lowest index), even if
  the second largest is a hair behind. "random" draws from N + 1 choices, "fixed" pins
  ``target`` whatever the speeds. For N = 2 this is the paper's rule exactly (``|s_0 − s_1| >
  α``, k = 0 if s_0 > s_1). :func:`describe_speeds` on the [T, N] speeds of a vanilla run
  shows how often each modality leads and by what margin.

  Two controls for guided's decision: ``method="fixed"`` runs guided's schedule as if every
  speed test passed (after warm-up: one normal step, then ``window`` re-balancing steps, and
  again) with the target pinned to modality ``target``; ``method="random"`` with ``shares``
  draws re-balancing of modality k with probability ``shares[k]`` (a normal step with the
  rest) instead of uniformly, so that a random schedule can match another's amount.

  In a re-balancing step for modality k the wrapped optimizer's updates are masked:
  ``update="branch"`` moves only main_k; ``update="all"`` moves everything except the
  fusion heads into φ_k. Masked parameters do not move, whatever ``inner`` is, and their
  entries of ``inner``'s state (momentum, Adam moments) stay as they were. The forward pass
  of that step must cut the cross-modal flow into φ_k: read the target with
  :func:`rebalance_target` (or :func:`step_mode`) before computing the gradients, and pass
  it as ``cut`` to the model's :class:`gml_jax.CrossModalCut` pieces (or MMTM).

  **Where it sits in an optax chain: outermost.** Everything that changes updates (weight
  decay, clipping of updates, learning-rate schedules) goes *inside*, as ``inner``:
  ``balanced_multimodal(optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1)),
  labels)``. A transform chained *after* it, e.g. ``optax.chain(balanced_multimodal(...),
  optax.add_decayed_weights(1e-4))``, moves the parameters that a re-balancing step
  freezes. Gradient clipping *before* it (``optax.chain(optax.clip_by_global_norm(1.0),
  balanced_multimodal(...))``) and ``optax.MultiSteps`` around it are fine, but μ is then
  measured on the clipped or accumulated gradient; ``optax.MultiSteps`` *inside* it is
  refused (it would mix the gradients of steps of different modes). :func:`check_masking`
  tests a ``tx`` in one call. The numeric options are Python numbers fixed when the
  transform is built (``optax.inject_hyperparams`` around it is refused): inject the
  learning rate into ``inner`` and change it with :func:`set_hyperparams`.

  The decision follows the sign of d_speed, and μ = ‖g‖²/‖θ‖² depends on the scale of each
  group's inputs and weights: standardise the inputs, and beware fusion layers initialised
  at zero (‖θ‖² ≈ 0 makes μ huge; :func:`speed_warnings` reports it).
  :func:`describe_speeds` tells from a vanilla run where d_speed sits against α.

  Example (a two-branch model; each branch's parameters feed its own group)::

    >>> import jax.numpy as jnp, optax, gml_jax
    >>> params = {'a': jnp.ones(3), 'b': jnp.ones(3), 'fuse': jnp.ones(2)}
    >>> labels = {'a': 'main:0', 'b': 'main:1', 'fuse': 'fusion:shared'}
    >>> tx = gml_jax.balanced_multimodal(optax.sgd(0.1), labels, alpha=0.01, window=2)
    >>> state = tx.init(params)
    >>> grads = {'a': jnp.full(3, 0.1), 'b': jnp.full(3, 1.0), 'fuse': jnp.ones(2)}
    >>> updates, state = tx.update(grads, state, params)
    >>> [round(float(s), 3) for s in gml_jax.modality_speeds(state)]
    [2.0, 0.0]
    >>> int(gml_jax.rebalance_target(state))  # s_0 > s_1: modality 0 is re-balanced next
    0
    >>> updates, state = tx.update(grads, state, params)
    >>> [round(float(u[0]), 4) for u in (updates['a'], updates['b'], updates['fuse'])]
    [-0.01, 0.0, 0.0]

  Args:
    inner: the optimizer to wrap (any optax transformation, stateful or not).
    labels: a tree with the structure of the parameters whose leaves are ``"main:<k>"``,
      ``"fusion:<k>"``, ``"fusion:shared"`` or ``"other"``, or a function of the
      parameters that returns one.
    method: ``"guided"`` (default), ``"random"`` or ``"vanilla"``.
    alpha: imbalance threshold α on the log10 scale (authors' value 0.01).
    window: Q, the number of re-balancing steps a decision triggers (authors' value 5).
    warmup_steps: steps before any re-balancing (authors' value: one epoch).
    update: ``"branch"`` (default, the paper) or ``"all"`` (the authors' code).
    seed: seed of the ``"random"`` method's draws.
    target: the modality that ``"fixed"`` re-balances (ignored by the other methods).
    shares: ``"random"`` only: the probability, per modality, that a step after warm-up
      re-balances it (a sequence of N numbers in [0, 1] summing to at most 1); None: every
      choice in {normal, modality 0, ..., N-1} has probability 1 / (N + 1).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params,
    **extra)`` needs ``params`` (extra keyword arguments go on to ``inner``, e.g. the
    ``scores`` of :func:`gml_jax.ogm_ge`); its state is a :class:`BalanceState`.

  References:
    Wu, Jastrzębski, Cho, Geras, ICML 2022, https://arxiv.org/abs/2202.05306
  """
  _check_static(alpha=alpha, window=window, warmup_steps=warmup_steps, seed=seed, target=target)
  _check_not_accumulating(inner)
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
  if update not in UPDATE_MODES:
    raise ValueError(f"Unknown update mode {update!r}; expected one of {UPDATE_MODES}.")
  if not alpha >= 0:
    raise ValueError(f"alpha must be a number >= 0, got {alpha!r}.")
  if int(window) != window or window < 1:
    raise ValueError(f"window (Q) must be an integer >= 1, got {window!r}.")
  if int(warmup_steps) != warmup_steps or warmup_steps < 0:
    raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}.")
  window, warmup_steps = int(window), int(warmup_steps)
  if method == "fixed" and (int(target) != target or target < 0):
    raise ValueError(f"target must be a modality index >= 0, got {target!r}.")
  if shares is not None:
    if method != "random":
      raise ValueError(f"shares are for method='random'; got method={method!r}.")
    shares = np.asarray(shares, np.float64)
    if shares.ndim != 1 or not np.all((shares >= 0) & (shares <= 1)) or shares.sum() > 1 + 1e-9:
      raise ValueError("shares must be one probability in [0, 1] per modality, summing to at "
                       f"most 1; got {shares.tolist()}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    n = num_modalities(labels, params)
    inner_state = inner.init(params)
    _check_not_accumulating(inner_state)
    if method == "fixed" and target >= n:
      raise ValueError(f"target={target} names no modality: the labels have {n}.")
    if shares is not None and len(shares) != n:
      raise ValueError(f"shares has {len(shares)} values; the labels have {n} modalities.")
    zeros = lambda: jnp.zeros((n,), jnp.float32)  # distinct buffers: states get donated
    return BalanceState(
        step=jnp.zeros((), jnp.int32),
        target=jnp.full((), NORMAL_STEP, jnp.int32),
        window_left=jnp.zeros((), jnp.int32),
        mu_main=zeros(),
        mu_fusion=zeros(),
        param_sq_main=zeros(),
        param_sq_fusion=zeros(),
        accum_main=zeros(),
        accum_fusion=zeros(),
        accum_main_low=zeros(),
        accum_fusion_low=zeros(),
        rebalance_steps=jnp.zeros((n,), jnp.int32),
        update_all=jnp.asarray(update == "all"),
        inner_state=inner_state,
    )

  def next_mode(state: BalanceState, rebalancing, speeds, n):
    """(target, window_left) of step state.step + 1, per the method's state machine."""
    t = state.step
    if method == "vanilla":
      return jnp.full((), NORMAL_STEP, jnp.int32), jnp.zeros((), jnp.int32)
    if method == "random":
      key = jax.random.fold_in(jax.random.key(seed), t)
      if shares is None:
        draw = jax.random.randint(key, (), -1, n, dtype=jnp.int32)  # -1: normal
      else:  # choice 0 is a normal step, choice k + 1 re-balances modality k
        p = np.concatenate([[max(0.0, 1.0 - shares.sum())], shares])
        draw = jax.random.choice(key, n + 1, p=jnp.asarray(p, jnp.float32)).astype(jnp.int32) - 1
      drawn = jnp.where(t + 1 >= warmup_steps, draw, NORMAL_STEP)
      return drawn, (drawn >= 0).astype(jnp.int32)
    # guided, and fixed: guided with every speed test passed and the target pinned
    left = state.window_left - 1
    start = ~rebalancing & (t >= warmup_steps)
    if method == "guided":
      start &= jnp.abs(speed_gap(speeds)) > alpha
      chosen = jnp.argmax(speeds).astype(jnp.int32)
    else:
      chosen = jnp.int32(target)
    target_next = jnp.where(
        rebalancing,
        jnp.where(left > 0, state.target, NORMAL_STEP),
        jnp.where(start, chosen, NORMAL_STEP),
    )
    window_left = jnp.where(rebalancing, jnp.maximum(left, 0), jnp.where(start, window, 0))
    return target_next.astype(jnp.int32), window_left.astype(jnp.int32)

  def update_fn(updates, state: BalanceState, params=None, **extra_args):
    if params is None:
      raise ValueError("balanced_multimodal needs the parameters: tx.update(grads, state, params).")
    if not isinstance(state, BalanceState):
      raise ValueError(f"balanced_multimodal's update got a {type(state).__name__} as its state; "
                       "expected the BalanceState that its init returned (is the chain the same "
                       "as the one that made the state?).")
    parsed = resolve_labels(labels, params)
    n = state.accum_main.shape[0]
    grad_leaves, param_def = jax.tree.flatten(updates)
    param_leaves = jax.tree.leaves(params)

    # §2: μ from the raw gradients and the parameters before this step's update.
    g_main, g_fusion = _group_sums(grad_leaves, parsed, n)
    p_main, p_fusion = _group_sums(param_leaves, parsed, n)
    mu_main, mu_fusion = _ratio(g_main, p_main), _ratio(g_fusion, p_fusion)
    rebalancing = state.target >= 0
    keep = lambda new, old: tuple(jnp.where(rebalancing, o, n) for n, o in zip(new, old))
    main_sum = keep(_compensated_add(state.accum_main, state.accum_main_low, mu_main),
                    (state.accum_main, state.accum_main_low))
    fusion_sum = keep(_compensated_add(state.accum_fusion, state.accum_fusion_low, mu_fusion),
                      (state.accum_fusion, state.accum_fusion_low))
    speeds = speeds_from_accumulators(main_sum[0] + main_sum[1], fusion_sum[0] + fusion_sum[1])

    # §3: masked update. Frozen leaves get a zero gradient, a zero update and their old
    # optimizer state back, so that no optimizer can move them.
    moves = _masks(parsed, state.target, state.update_all)
    masked = [jnp.where(m, g, jnp.zeros_like(g)) for m, g in zip(moves, grad_leaves)]
    inner_updates, inner_state = inner.update(
        jax.tree.unflatten(param_def, masked), state.inner_state, params, **extra_args
    )
    inner_state = _select_param_state(moves, param_def, inner_state, state.inner_state)
    new_updates = [
        jnp.where(m, u, jnp.zeros_like(u)) for m, u in zip(moves, jax.tree.leaves(inner_updates))
    ]

    target, window_left = next_mode(state, rebalancing, speeds, n)
    counted = jax.nn.one_hot(state.target, n, dtype=jnp.int32)  # all zeros when normal
    new_state = BalanceState(
        step=state.step + 1,
        target=target,
        window_left=window_left,
        mu_main=mu_main,
        mu_fusion=mu_fusion,
        param_sq_main=p_main,
        param_sq_fusion=p_fusion,
        accum_main=main_sum[0],
        accum_fusion=fusion_sum[0],
        accum_main_low=main_sum[1],
        accum_fusion_low=fusion_sum[1],
        rebalance_steps=state.rebalance_steps + counted,
        update_all=state.update_all,
        inner_state=inner_state,
    )
    return jax.tree.unflatten(param_def, new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------
# Reading the state


def _unwrap(x):
  """The array inside an NNX variable (``nnx.Optimizer`` wraps its state), else ``x``."""
  return x.get_value() if hasattr(x, "get_value") else x


def balance_state(opt_state: Any) -> BalanceState:
  """The :class:`BalanceState` inside an optimizer state (plain optax or ``nnx.Optimizer``)."""
  found = find_balance_state(opt_state)
  if found is None:
    hint = ""
    if _holds_bare_fields(opt_state, BalanceState._fields):
      hint = (" It holds a BalanceState's fields as a plain dict: a checkpoint restored without "
              "a target loses the state's types. Restore with the state as target, e.g. orbax's "
              "ckptr.restore(path, args=ocp.args.StandardRestore(tx_state_template)) or "
              "flax.serialization.from_state_dict(template, restored).")
    raise ValueError(
        f"Expected one balanced_multimodal state in the optimizer state, found 0.{hint}")
  return found


def _holds_bare_fields(tree: Any, fields: Sequence[str]) -> bool:
  """Whether ``tree`` has a dict (anywhere) keyed by the given NamedTuple fields."""
  found = []

  def visit(node) -> bool:
    if isinstance(node, dict) and set(fields) <= set(node):
      found.append(node)
    return False

  jax.tree.leaves(tree, is_leaf=visit)
  return bool(found)


def find_balance_state(opt_state: Any) -> BalanceState | None:
  """Like :func:`balance_state`, or None when the optimizer has no balancing transform."""
  return find_state(opt_state, BalanceState, "balanced_multimodal")


def find_state(opt_state: Any, state_type: type, transform: str):
  """The one ``state_type`` NamedTuple inside an optimizer state (plain optax or
  ``nnx.Optimizer``, whose variables are unwrapped), or None; an error if there are more."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, state_type))
           if isinstance(s, state_type)]
  if len(found) > 1:
    raise ValueError(f"Expected one {transform} state in the optimizer state, found {len(found)}.")
  if not found:
    return None
  return state_type(*(
      jax.tree.map(_unwrap, field, is_leaf=lambda x: hasattr(x, "get_value"))
      for field in found[0]
  ))


def rebalance_target(opt_state: Any) -> jax.Array:
  """Modality that the next step re-balances (int32 scalar), -1 for a normal step: pass it
  as ``cut`` to the model's forward pass of that step."""
  return balance_state(opt_state).target


def modality_speeds(opt_state: Any) -> jax.Array:
  """Conditional learning speed s_k of every modality (float32[N]; NaN while undefined)."""
  return speeds_from_accumulators(*accumulated(balance_state(opt_state)))


def update_mask(opt_state: Any, labels: Labels, tree: Any) -> Any:
  """Tree of bool scalars: True where a leaf of ``tree`` may change in the step that
  ``opt_state`` is about to take (the mask of the *next* ``tx.update``).

  Read it from the state *before* ``tx.update``; after it, it is the following step's
  mask. In a hand-written step prefer :func:`step_mode` and :func:`keep_frozen`, which
  cannot be mixed up that way.
  """
  state = balance_state(opt_state)
  parsed = resolve_labels(labels, tree)
  return jax.tree.unflatten(
      jax.tree.structure(tree), _masks(parsed, state.target, state.update_all)
  )


# --------------------------------------------------------------------------------------
# A hand-written step: the mode of the coming step and the model state it freezes


class StepMode(NamedTuple):
  """What the coming step does, read with :func:`step_mode` *before* ``tx.update``.

  Attributes:
    target: int32, the modality this step re-balances (the model's ``cut``), -1 normal.
    update_all: bool, the transform's ``update="all"``.
  """

  target: jax.Array
  update_all: jax.Array


def step_mode(opt_state: Any) -> StepMode:
  """The :class:`StepMode` of the step that ``opt_state`` is about to take.

  In a hand-written train step, read it first, pass ``mode.target`` as the model's ``cut``,
  and after ``tx.update`` give it to :func:`keep_frozen` with the model state the forward
  pass returned::

    mode = gml_jax.step_mode(opt_state)
    (logits, branch_logits), new_stats = model.apply(
        {"params": params, **stats}, x, train=True, cut=mode.target,
        mutable=["batch_stats", "fusion_stats"])
    ...
    updates, opt_state = tx.update(grads, opt_state, params)
    stats = gml_jax.keep_frozen(mode, labels, new_stats, stats)

  ``new_stats`` is the dict of collections that ``mutable`` returns; ``labels`` (rules over
  module paths) label each collection. The library's :func:`gml_jax.make_train_step` does
  all of this. For NNX, whose state is read live from the model, use
  :func:`gml_jax.nnx.stats` and :func:`gml_jax.nnx.keep_frozen` (``docs/tutorials/n_modalities.md``
  has the whole step).
  """
  state = balance_state(opt_state)
  return StepMode(target=state.target, update_all=state.update_all)


def keep_frozen(mode: StepMode, labels: Labels, new: Any, old: Any) -> Any:
  """``new`` with the leaves that the step of ``mode`` freezes put back to ``old``.

  For model state that the forward pass updates outside the optimizer: BatchNorm
  statistics, the running means of :class:`gml_jax.CrossModalCut`. ``labels`` labels
  ``new`` like the parameters (the same rules apply to every collection). ``new`` may be
  one collection or the dict of collections that Linen's ``mutable=[...]`` returns: when a
  label function does not match the whole dict, each collection is labelled on its own.

  ``old`` must be the values *before* the forward pass. An ``nnx.State`` read with
  ``nnx.state(model)`` holds live variables: read after the forward pass, or the same
  object as ``new``, it already holds the new values and nothing would be kept. Passing
  the same variables as ``new`` and ``old`` is refused; an ``old`` read too late cannot be
  detected: take a copy before the forward pass (:func:`gml_jax.nnx.stats`) or use
  :func:`gml_jax.nnx.keep_frozen`, which does both.

  Args:
    mode: the :class:`StepMode` read with :func:`step_mode` before ``tx.update``.
    labels: a label tree or function (see :mod:`gml_jax.labels`).
    new: the state after the forward pass.
    old: the state before it (same structure; values, not the same live variables).
  """
  if not isinstance(mode, StepMode):
    raise TypeError(
        f"keep_frozen takes the StepMode of the step, read with gml_jax.step_mode(opt_state) "
        f"before tx.update; got {type(mode).__name__}. (An optimizer state read after "
        "tx.update would give the next step's mask.)")
  if jax.tree.structure(new) != jax.tree.structure(old):
    raise ValueError("keep_frozen: `new` and `old` model state differ in structure.\n"
                     f"  new: {str(jax.tree.structure(new))[:300]}\n"
                     f"  old: {str(jax.tree.structure(old))[:300]}")
  _check_not_aliased(new, old)
  try:
    parsed = resolve_labels(labels, new)
  except ValueError as whole_error:
    if not (callable(labels) and isinstance(new, dict) and new):
      raise
    try:  # the dict of collections that `mutable=[...]` returns: each labelled on its own
      # (in jax.tree's leaf order: a dict's keys sorted)
      parsed = [p for name in sorted(new) for p in resolve_labels(labels, new[name])]
    except ValueError as collection_error:
      if set(new) & _COLLECTIONS:  # it is a dict of collections: the error inside one counts
        raise collection_error from None
      raise whole_error from None
  moves = _masks(parsed, mode.target, mode.update_all)
  kept = [jnp.where(m, n, o) for m, n, o in zip(moves, jax.tree.leaves(new), jax.tree.leaves(old))]
  return jax.tree.unflatten(jax.tree.structure(new), kept)


_COLLECTIONS = {"params", "batch_stats", "fusion_stats", "train_means", "nnx_other", "cache"}
"""Collection names by which keep_frozen recognises Linen's dict of collections."""


def _check_not_aliased(new: Any, old: Any) -> None:
  """Refuses ``new`` and ``old`` that are, or hold, the same live NNX variables."""
  is_variable = lambda x: hasattr(x, "get_value") and hasattr(x, "set_value")
  shared = new is old or any(
      n is o and is_variable(n) for n, o in zip(jax.tree.leaves(new, is_leaf=is_variable),
                                                jax.tree.leaves(old, is_leaf=is_variable)))
  if shared:
    raise ValueError(
        "keep_frozen: `new` and `old` are the same live variables (nnx.state(model) returns "
        "references, which the forward pass updates), so nothing could be kept frozen. Copy "
        "the state before the forward pass: old = gml_jax.nnx.stats(model) (or "
        "nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))), and after tx.update call "
        "gml_jax.nnx.keep_frozen(mode, labels, model, old).")


# --------------------------------------------------------------------------------------
# Checks and guidance for a user's own model


def _group_names(n: int) -> list[str]:
  return [f"main:{k}" for k in range(n)] + [f"fusion:{k}" for k in range(n)]


def group_sizes(params: Any, labels: Labels) -> dict[str, int]:
  """The number of parameters (array elements) under each label of ``labels``, e.g.
  ``{"main:0": 120, "fusion:shared": 30, "other": 12}``: how much of the model each group
  holds, and how much is labelled ``other`` (never measured, and frozen in
  ``update="branch"`` re-balancing steps)."""
  sizes: dict[str, int] = {}
  for (kind, k), x in zip(resolve_labels(labels, params), jax.tree.leaves(params)):
    name = "other" if kind == "other" else ("fusion:shared" if kind == "shared" else f"{kind}:{k}")
    sizes[name] = sizes.get(name, 0) + int(np.size(x))
  return sizes


def speed_warnings(opt_state: Any, params: Any = None, labels: Labels | None = None) -> list[str]:
  """Reasons not to trust the conditional learning speeds of ``opt_state``, as sentences
  (an empty list when there are none).

  Reported: a group whose ‖θ‖² at the last step is zero or below
  :data:`TINY_PARAMETERS` of the largest group's (μ = ‖g‖²/‖θ‖² is then huge and follows
  the denominator: a fusion layer initialised at zero does this); a group whose μ or M is
  NaN or infinite (NaN gradients or parameters, e.g. float16 overflow: the speed is NaN
  for good, and guided never re-balances again); undefined speeds (a group that has had no
  gradient yet). With ``params`` and ``labels``: the share of parameters labelled
  ``other`` (unmeasured, and frozen in ``update="branch"`` re-balancing steps).
  """
  state = balance_state(opt_state)
  warnings = []
  if params is not None and labels is not None:
    sizes = group_sizes(params, labels)
    total = sum(sizes.values())
    if sizes.get("other", 0):
      warnings.append(
          f"{sizes['other']} of {total} parameters ({sizes['other'] / total:.1%}) are labelled "
          "'other': no speed measures them, and update='branch' re-balancing steps freeze them.")
  if int(state.step) == 0:
    return ["No step taken yet: the speeds are undefined."] + warnings
  n = len(state.param_sq_main)
  sizes = np.concatenate([np.asarray(state.param_sq_main), np.asarray(state.param_sq_fusion)])
  mus = np.concatenate([np.asarray(state.mu_main), np.asarray(state.mu_fusion)])
  main_sum, fusion_sum = (np.asarray(x) for x in accumulated(state))
  sums = np.concatenate([main_sum, fusion_sum])
  finite = sizes[np.isfinite(sizes)]
  largest = float(np.max(finite)) if finite.size else 0.0
  for name, size, mu, total_mu in zip(_group_names(n), sizes, mus, sums):
    if not (np.isfinite(size) and np.isfinite(mu) and np.isfinite(total_mu)):
      warnings.append(
          f"Group {name} is NaN or infinite (‖θ‖² = {size:.3g}, μ = {mu:.3g} at the last step, "
          f"M = {total_mu:.3g}): NaN gradients or parameters (float16 overflow or underflow? "
          "train in float32, or bfloat16 through make_train_step's compute_dtype). Its speed "
          "stays NaN, and guided never re-balances again.")
    elif size <= TINY_PARAMETERS * largest:
      warnings.append(
          f"Group {name} has ‖θ‖² = {size:.3g} against {largest:.3g} for the largest group: "
          "its μ = ‖g‖²/‖θ‖² is dominated by the near-zero denominator (a zero-initialised "
          "fusion layer?), so the speeds and the re-balancing decision follow its scale.")
  for k in range(n):
    pair = (main_sum[k], fusion_sum[k])
    if not all(np.isfinite(pair)):
      continue  # reported above, as NaN
    if min(pair) <= 0:
      empty = [g for g, m in zip((f"main:{k}", f"fusion:{k}"), pair) if m <= 0]
      warnings.append(f"s_{k} is undefined: {' and '.join(empty)} has had no gradient yet.")
  return warnings


def _lead_margins(speeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per step: the modality with the largest speed (guided's pick) and its lead over the
  second largest, from speeds [T, N] without NaN."""
  order = np.argsort(-speeds, axis=1, kind="stable")
  top = np.take_along_axis(speeds, order[:, :2], axis=1)
  return order[:, 0], top[:, 0] - top[:, 1]


def _describe_run(values: np.ndarray, alpha: float) -> dict:
  """describe_speeds of one run: d_speed [T] or speeds [T, N]."""
  if values.ndim == 1:
    d_speed, speeds = values, None
  else:
    speeds = values[np.all(np.isfinite(values), axis=1)]
    d_speed = (values[:, 0] - values[:, 1] if values.shape[1] == 2  # speed_gap, in float64
               else values.max(axis=1) - values.min(axis=1))
  steps = d_speed.size
  d_speed = d_speed[np.isfinite(d_speed)]
  if d_speed.size == 0:
    raise ValueError("describe_speeds needs at least one step with finite speeds.")
  last = d_speed[-1]
  out = {
      "mean": float(d_speed.mean()), "std": float(d_speed.std()),
      "min": float(d_speed.min()), "max": float(d_speed.max()),
      "share_above_alpha": float(np.mean(np.abs(d_speed) > alpha)),
      "favoured": int(last < 0),
      "sign_agreement": float(np.mean(np.sign(d_speed) == np.sign(last))),
      "alpha_for_half": float(np.median(np.abs(d_speed))),
      "undefined_steps": int(steps - d_speed.size),
  }
  if speeds is None:
    return out
  n = speeds.shape[1]
  leader, margin = _lead_margins(speeds)
  out["favoured"] = int(leader[-1])
  out["lead_agreement"] = float(np.mean(leader == leader[-1]))
  out["modalities"] = [{
      "modality": k,
      "mean_speed": float(speeds[:, k].mean()),
      "leads": float(np.mean(leader == k)),
      "margin": float(margin[leader == k].mean()) if np.any(leader == k) else None,
  } for k in range(n)]
  if n > 2:  # the spread is never negative: its sign says nothing
    del out["sign_agreement"]
  return out


def describe_speeds(speeds: Any, alpha: float = 0.01) -> dict:
  """Where the speeds of a run sit against α (typically a short ``method="vanilla"`` run
  past its warm-up, where the speeds are measured and not acted on).

  ``speeds`` is one of:

  * d_speed per step, [T] (two modalities: s_0 − s_1; N > 2: the spread);
  * the speeds s_k of every modality per step, [T, N] (the ``speeds`` metric of the steps);
  * several runs (seeds) of the latter: a list of [T_i, N] arrays, or an array [S, T, N].

  Returns a dict: ``mean``, ``std``, ``min``, ``max`` of d_speed; ``share_above_alpha``,
  the share of steps with ``|d_speed|`` > α (each such normal step would start a window of Q
  re-balancing steps: near 1, guided runs back-to-back windows, a fixed schedule);
  ``favoured``, the modality that guided would re-balance at the last step (the largest
  s_k; from d_speed alone: 0 if > 0, 1 if < 0); ``sign_agreement`` (d_speed or N = 2), the
  share of steps whose sign matches the last one (low values: the decision follows
  noise); ``alpha_for_half``, the median of ``|d_speed|``, the α at which half the steps would
  re-balance, a starting point for a sweep (``--grid balance.guided.alpha=...``
  in a study);
  ``undefined_steps``, steps whose d_speed is NaN (left out of the rest: no gradient yet,
  or NaN gradients: see :func:`speed_warnings`).

  From [T, N] speeds, also: ``lead_agreement``, the share of steps whose leader (largest
  s_k) is the last step's; and ``modalities``, per modality k: ``mean_speed``, ``leads``
  (the share of steps where s_k is the largest, i.e. where guided would pick k) and
  ``margin`` (the mean lead of s_k over the second largest speed on those steps; None if it
  never leads). With N > 2 the spread, not the margin, is what α is compared with: a
  margin far below the spread means the speed test passes while the choice of modality
  is close.

  From several runs: ``runs``, the dict above for each run; ``favoured`` per run;
  ``stable``, whether every run favours the same modality at its end; and ``leads`` and
  ``share_above_alpha`` averaged over the runs.

  >>> r = describe_speeds([0.30, 0.20, 0.25, 0.35], alpha=0.01)
  >>> r["favoured"], r["share_above_alpha"], round(r["alpha_for_half"], 3)
  (0, 1.0, 0.275)
  >>> r = describe_speeds([[0.1, 0.5, 0.45], [0.2, 0.4, 0.5]], alpha=0.01)
  >>> r["favoured"], [m["leads"] for m in r["modalities"]], round(r["modalities"][2]["margin"], 3)
  (2, [0.0, 0.5, 0.5], 0.1)
  """
  runs = None
  if isinstance(speeds, (list, tuple)) and speeds and all(np.ndim(r) == 2 for r in speeds):
    runs = [np.asarray(r, np.float64) for r in speeds]
  elif np.ndim(speeds) == 3:
    runs = list(np.asarray(speeds, np.float64))
  if runs is None:
    values = np.asarray(speeds, np.float64)
    if values.ndim not in (1, 2) or (values.ndim == 2 and values.shape[1] < 2):
      raise ValueError("describe_speeds takes d_speed [T], speeds [T, N] with N >= 2, or "
                       f"several runs [S, T, N]; got shape {values.shape}.")
    return _describe_run(values, alpha)
  if len({r.shape[1] for r in runs}) != 1 or runs[0].shape[1] < 2:
    raise ValueError("describe_speeds: every run must have speeds [T_i, N] with the same N >= 2;"
                     f" got shapes {[r.shape for r in runs]}.")
  each = [_describe_run(r, alpha) for r in runs]
  favoured = [r["favoured"] for r in each]
  n = runs[0].shape[1]
  return {
      "runs": each,
      "favoured": favoured,
      "stable": len(set(favoured)) == 1,
      "leads": [float(np.mean([r["modalities"][k]["leads"] for r in each])) for k in range(n)],
      "share_above_alpha": float(np.mean([r["share_above_alpha"] for r in each])),
  }


def _forced(state: Any, target: int) -> Any:
  """``state`` with its BalanceState forced into a step for ``target`` (-1: normal)."""
  window = 0 if target < 0 else 1
  return jax.tree.map(
      lambda s: s._replace(target=jnp.int32(target), window_left=jnp.int32(window))
      if isinstance(s, BalanceState) else s,
      state, is_leaf=lambda s: isinstance(s, BalanceState))


def check_masking(tx: optax.GradientTransformation, params: Any, labels: Labels,
                  seed: int = 0, normal_steps: int = 3, rebalance_steps: int = 2,
                  **extra_args) -> None:
  """Checks that ``tx`` keeps frozen parameters in place in re-balancing steps, also after
  the state that earlier steps built up (momentum, Adam moments).

  On random gradients (a new draw every step), for every modality k: ``normal_steps``
  normal steps, then ``rebalance_steps`` re-balancing steps for k (the state forced into
  each mode), applying every update. Raises if

  * a normal step moved no parameter at all: ``tx`` wraps an optimizer that does not apply
    every update (``optax.MultiSteps`` inside the transform; the right order is
    ``optax.MultiSteps(balanced_multimodal(inner, labels), k)``);
  * a parameter that a re-balancing step must freeze moved: something after
    :func:`balanced_multimodal` in an optax chain changes updates (weight decay, or a
    ``optax.trace``/``scale_by_adam`` whose momentum from the normal steps carries on).

  Returns None when ``tx`` is safe.

  Args:
    tx: the optimizer as it will be used; it must contain one ``balanced_multimodal``.
    params: the model's parameters (their values matter: weight decay reads them).
    labels: the labels given to the transform.
    seed: seed of the random gradients.
    normal_steps: normal steps before the re-balancing ones (>= 1).
    rebalance_steps: re-balancing steps checked per modality (>= 1).
    **extra_args: passed on to ``tx.update`` (e.g. ``scores=`` for :func:`gml_jax.ogm_ge`).
  """
  if normal_steps < 1 or rebalance_steps < 1:
    raise ValueError(f"check_masking needs normal_steps >= 1 and rebalance_steps >= 1; got "
                     f"{normal_steps} and {rebalance_steps}.")
  tx = optax.with_extra_args_support(tx)
  start = tx.init(params)
  balance = balance_state(start)
  parsed = resolve_labels(labels, params)
  paths = [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng((seed, 0x6D61736B))  # a stream of its own, not the usual (0)

  def random_grads():  # drawn on the host: no device program per draw
    return jax.tree.unflatten(treedef, [
        jnp.asarray(rng.normal(size=jnp.shape(x)), jnp.result_type(x)) for x in leaves])

  # An accumulation around the transform (the right order: the transform refuses one
  # inside) legitimately emits zero updates between its applying steps.
  accumulates_around = bool(_accumulating(start))
  update = lambda g, s, p: tx.update(g, s, p, **extra_args)
  if accumulates_around:  # its lax.cond compiles at every eager call: compile once instead
    update = jax.jit(update)
  mode = "all" if bool(balance.update_all) else "branch"
  problems = []
  state, current = start, params
  for t in range(normal_steps):
    updates, state = update(random_grads(), _forced(state, -1), current)
    if not accumulates_around and not any(bool(jnp.any(u != 0))
                                          for u in jax.tree.leaves(updates)):
      raise ValueError(
          f"check_masking: normal step {t} moved no parameter on random gradients: tx does "
          "not apply every update (optax.MultiSteps or another gradient accumulation inside "
          "balanced_multimodal?). Accumulate around the transform: "
          "optax.MultiSteps(balanced_multimodal(inner, labels), every_k_schedule=k).")
    current = optax.apply_updates(current, updates)
  normal_state, normal_params = state, current
  for target in range(balance.accum_main.shape[0]):
    state, current = normal_state, normal_params  # every modality from the same history
    for t in range(rebalance_steps):
      updates, state = update(random_grads(), _forced(state, target), current)
      moves = _masks(parsed, jnp.int32(target), balance.update_all)
      for path, (kind, k), may, u in zip(paths, parsed, moves, jax.tree.leaves(updates)):
        if not bool(may) and bool(jnp.any(u != 0)):
          label = "other" if kind == "other" else ("fusion:shared" if kind == "shared"
                                                   else f"{kind}:{k}")
          problem = f"{path!r} ({label}) in a step for modality {target}"
          if not any(p.startswith(problem) for p in problems):  # each once, at its first step
            problems.append(problem + (f" (re-balancing step {t + 1})" if t else ""))
      current = optax.apply_updates(current, updates)
  if problems:
    raise ValueError(
        f"Parameters that a re-balancing step (update={mode!r}) must freeze moved: "
        f"{', '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}. Something after "
        "balanced_multimodal in the optax chain changes updates (e.g. "
        "optax.add_decayed_weights, or optax.trace / scale_by_adam, whose momentum from "
        "normal steps carries on): put it inside, balanced_multimodal(optax.chain(..., "
        "optimizer), labels), so that the transform is outermost.")


def set_hyperparams(opt_state: Any, **values) -> Any:
  """``opt_state`` with hyperparameters injected by ``optax.inject_hyperparams`` set to
  ``values`` (e.g. ``learning_rate=1e-4``), wherever they sit in the state: the way to
  change the inner optimizer's learning rate during a run::

    tx = gml_jax.balanced_multimodal(
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3), labels)
    ...
    opt_state = gml_jax.set_hyperparams(opt_state, learning_rate=1e-4)

  The new values keep the dtype of the old ones. Raises if a name is injected nowhere.
  (``balanced_multimodal``'s own α, Q and warm-up are fixed when it is built.)
  """
  found = set()
  is_injected = lambda x: hasattr(x, "hyperparams") and hasattr(x, "_replace")

  def set_in(node):
    if not is_injected(node):
      return node
    hyperparams = dict(node.hyperparams)
    for name, value in values.items():
      if name in hyperparams:
        found.add(name)
        old = hyperparams[name]
        cast = jnp.asarray(value, jnp.result_type(_unwrap(old)))
        if hasattr(old, "set_value"):  # an nnx.Optimizer's state: its variables, in place
          old.set_value(cast)
        else:
          hyperparams[name] = cast
    return node._replace(hyperparams=hyperparams)

  new_state = jax.tree.map(set_in, opt_state, is_leaf=is_injected)
  missing = sorted(set(values) - found)
  if missing:
    names = set()
    jax.tree.leaves(opt_state, is_leaf=lambda x: bool(
        is_injected(x) and names.update(x.hyperparams)) or is_injected(x))
    raise ValueError(
        f"set_hyperparams: {missing} injected nowhere in the optimizer state (injected: "
        f"{sorted(names) or 'none'}). Wrap the optimizer that has them with "
        "optax.inject_hyperparams, e.g. optax.inject_hyperparams(optax.adamw)(learning_rate=...).")
  return new_state
