"""MMPareto as an optax transform: the multimodal and unimodal losses' gradients combined per
modality encoder (Wei and Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
Assistance", ICML 2024).

The model is trained on the multimodal loss plus every unimodal loss (one head per
modality). For the encoder of modality k, the gradient of the multimodal loss g_m and that of
modality k's own loss g_k are combined: averaged when they agree (cosine > 0), else weighted
by the two-task min-norm (MGDA) solution; the combination is doubled, enlarged to the norm of
the plain sum where it is shorter, and multiplied by γ. ``docs/methods/mmpareto.md``
restates the method, where the paper, the authors' code and BalanceBenchmark differ, and
what is done here at each point.

The transform needs the per-loss gradients (``loss_grads``: a tree like the parameters whose
leaves have a leading axis of N + 1: [0] the gradient of the fused output's mean
cross-entropy, [1 + k] that of branch k's own mean cross-entropy); the combination itself is
a pure function of them. Labels are those of :func:`gml_jax.balanced_multimodal`:
``"main:<k>"`` leaves are combined (label heads ``"other"`` to leave them alone, as
:func:`gml_jax.models.encoder_labels` does), every other leaf passes unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gml_jax.balancing import find_state
from gml_jax.labels import Labels, num_modalities, resolve_labels

# The authors' solver never returns the end points exactly: it keeps 0.1% of the other task.
EDGE_WEIGHT = 0.999


class MMParetoState(NamedTuple):
  """State of :func:`mmpareto` (N = number of modalities).

  Attributes:
    step: int32, updates taken so far.
    cosines: float32[N], per modality the cosine between the fused loss's gradient and its
      own loss's gradient over its encoder at the last update (0 where either is zero).
    fused_weights: float32[N], the weight w_k of the fused loss's gradient (its own loss's is
      1 - w_k) at the last update: 0.5 where the cosine was positive.
    inner_state: state of the wrapped optimizer.
  """

  step: jax.Array
  cosines: jax.Array
  fused_weights: jax.Array
  inner_state: Any

  # The step protocol: keyword arguments of ``update``, and what train_metrics() returns.
  NEEDS = ("loss_grads",)
  METRICS = {"mmpareto_cosine": "mmpareto_cosine_{m}",  # noqa: RUF012
             "mmpareto_fused_weight": "mmpareto_fused_weight_{m}"}

  def train_metrics(self) -> dict:
    """What a train step reports of this state: the last update's cosines and weights."""
    return {"mmpareto_cosine": self.cosines, "mmpareto_fused_weight": self.fused_weights}


def min_norm_weight(v11: jax.Array, v12: jax.Array, v22: jax.Array) -> jax.Array:
  r"""The weight c of g_1 in the minimum-norm point c g_1 + (1 - c) g_2 of the segment
  between two vectors, from their inner products v11 = ⟨g_1, g_1⟩, v12 = ⟨g_1, g_2⟩,
  v22 = ⟨g_2, g_2⟩ (MGDA's two-task closed form):

  .. math::  c = \frac{v_{22} - v_{12}}{v_{11} + v_{22} - 2 v_{12}}

  At the end points the authors' solver returns 0.999 (v12 >= v11: g_1 is the shorter end)
  or 0.001 (v12 >= v22), not 1 or 0, and so does this function; two zero vectors give
  0.999."""
  denominator = v11 + v22 - 2 * v12
  inside = (v22 - v12) / jnp.where(denominator > 0, denominator, 1.0)
  return jnp.where(v12 >= v11, EDGE_WEIGHT, jnp.where(v12 >= v22, 1 - EDGE_WEIGHT, inside))


def pareto_weight(v11: jax.Array, v12: jax.Array, v22: jax.Array) -> jax.Array:
  """The weight of the fused loss's gradient g_1 for one modality: 0.5 when g_1 and the
  modality's own gradient g_2 agree (⟨g_1, g_2⟩ > 0, i.e. cosine > 0), else
  :func:`min_norm_weight`."""
  return jnp.where(v12 > 0, 0.5, min_norm_weight(v11, v12, v22))


def rescaled(combined: jax.Array, plain: jax.Array, gamma: float) -> jax.Array:
  """γ · ``combined``, first enlarged to the norm of ``plain`` (the leaf's gradient of the
  summed losses) where it is shorter: γ · c · max(1, ‖plain‖ / ‖c‖). A zero ``combined``
  stays zero (the authors' 0/0 also leaves it unscaled)."""
  norm, reference = jnp.linalg.norm(combined), jnp.linalg.norm(plain)
  factor = jnp.where((reference > norm) & (norm > 0), reference / jnp.where(norm > 0, norm, 1),
                     1.0)
  return gamma * factor * combined


def _check_loss_grads(loss_grads, updates, n: int):
  """The leaves of ``loss_grads``, each checked to be [n + 1, *shape of the update leaf]."""
  leaves, treedef = jax.tree.flatten(loss_grads)
  if treedef != jax.tree.structure(updates):
    raise ValueError("mmpareto: loss_grads must be a tree like the gradients (one leaf per "
                     f"parameter, with a leading axis of N + 1 = {n + 1}); got the structure "
                     f"{str(treedef)[:300]}.")
  for g, u in zip(leaves, jax.tree.leaves(updates)):
    if jnp.shape(g) != (n + 1,) + jnp.shape(u):
      raise ValueError(f"mmpareto: each loss_grads leaf must have shape (N + 1, *leaf) = "
                       f"{(n + 1,) + jnp.shape(u)}: [0] the fused loss's gradient, [1 + k] "
                       f"branch k's; got {jnp.shape(g)}.")
  return leaves


def mmpareto(
    inner: optax.GradientTransformation,
    labels: Labels,
    *,
    gamma: float = 1.5,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer with MMPareto (Wei and Hu, ICML 2024).

  ``update(grads, state, params, *, loss_grads)`` takes, per parameter leaf, the gradients
  of the N + 1 losses stacked on a first axis: [0] of the fused output's mean cross-entropy
  L_m, [1 + k] of branch k's own L_k. The step should minimise L_m + Σ_k L_k, so that
  ``grads`` (which every leaf not labelled ``main:<k>`` receives unchanged: heads, fusion
  layers) is that sum's gradient: :func:`gml_jax.make_train_step` with ``loss="both"``
  (the runner's ``mmpareto`` sets it), which also computes ``loss_grads``. For modality k,
  over all its ``main:k`` leaves together (the authors concatenate the encoder's
  gradients), with g_m and g_k the two gradients:

  .. math::
     w_k = \begin{cases} 1/2 & \langle g_m, g_k\rangle > 0 \\
           \frac{\langle g_k, g_k\rangle - \langle g_m, g_k\rangle}
                {\lVert g_m - g_k\rVert^2} & \text{otherwise (min-norm)} \end{cases}

  then per leaf ℓ: c = 2 (w_k g_m^ℓ + (1 - w_k) g_k^ℓ), and the update's input is
  γ c max(1, ‖Σ_i g_i^ℓ‖ / ‖c‖), Σ_i over all N + 1 losses (the plain sum; in a late-fusion
  model Σ_i g_i^ℓ = g_m^ℓ + g_k^ℓ). With cross-modal fusion the other branches' losses
  reach encoder k too: they count in that norm, not in the direction (two tasks per
  encoder, as published).

  Composition: everything happens before ``inner`` (the authors: SGD, momentum 0.9, weight
  decay 1e-4). γ scales the encoders' step: under Adam it cancels, and the min-norm
  direction survives only as a direction. ``gml_jax.balanced_multimodal`` may wrap ``inner``
  (the conditional speeds then see the combined gradients); chaining with another transform
  that re-weights the same leaves (``ogm_ge``, :func:`gml_jax.agm.agm`) is allowed but is
  then neither method.

  Example (gradients that conflict: the min-norm weights, doubled, rescaled, times γ)::

    >>> import jax, jax.numpy as jnp, optax, gml_jax.mmpareto as mp
    >>> params = {'a': jnp.zeros(2), 'b': jnp.zeros(1)}
    >>> tx = mp.mmpareto(optax.sgd(1.0), {'a': 'main:0', 'b': 'main:1'}, gamma=1.0)
    >>> state = tx.init(params)
    >>> loss_grads = {'a': jnp.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]]),
    ...               'b': jnp.array([[1.0], [0.0], [1.0]])}
    >>> grads = jax.tree.map(lambda g: g.sum(0), loss_grads)
    >>> updates, state = tx.update(grads, state, params, loss_grads=loss_grads)
    >>> round(float(state.fused_weights[0]), 4), [round(float(x), 4) for x in updates['a']]
    (0.6, [-0.4472, -0.8944])

  Args:
    inner: the optimizer to wrap.
    labels: a tree like the parameters with leaves ``"main:<k>"`` (the encoder of modality
      k; N >= 2) and anything else :func:`gml_jax.balanced_multimodal` accepts (label heads
      ``"other"``), or a function returning one (e.g. :func:`gml_jax.models.encoder_labels`).
    gamma: γ, the final scale of every combined leaf (> 0; the authors' 1.5).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an :class:`MMParetoState`.

  References:
    Wei and Hu, ICML 2024, https://arxiv.org/abs/2405.17730
  """
  if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
    raise ValueError(f"mmpareto: gamma must be a number > 0, got {gamma!r}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    n = num_modalities(labels, params, fusion=False)
    return MMParetoState(step=jnp.zeros((), jnp.int32), cosines=jnp.zeros((n,), jnp.float32),
                         fused_weights=jnp.full((n,), 0.5, jnp.float32),
                         inner_state=inner.init(params))

  def update_fn(updates, state: MMParetoState, params=None, *, loss_grads=None, **extra_args):
    if loss_grads is None:
      raise ValueError("mmpareto needs the per-loss gradients: tx.update(grads, state, params, "
                       "loss_grads=...), a tree like grads whose leaves stack N + 1 gradients: "
                       "[0] the fused loss's, [1 + k] branch k's.")
    n = state.cosines.shape[0]
    per_loss = _check_loss_grads(loss_grads, updates, n)
    parsed = resolve_labels(labels, updates)
    leaves, treedef = jax.tree.flatten(updates)
    per_loss = [g.astype(jnp.float32) for g in per_loss]

    def dots(k):
      mine = [g for g, (kind, j) in zip(per_loss, parsed) if kind == "main" and j == k]
      v11 = sum(jnp.vdot(g[0], g[0]) for g in mine)
      v12 = sum(jnp.vdot(g[0], g[1 + k]) for g in mine)
      v22 = sum(jnp.vdot(g[1 + k], g[1 + k]) for g in mine)
      return v11, v12, v22

    products = [dots(k) for k in range(n)]
    weights = jnp.stack([pareto_weight(*p) for p in products]).astype(jnp.float32)
    cosines = jnp.stack([
        jnp.where(v11 * v22 > 0, v12 / jnp.sqrt(jnp.where(v11 * v22 > 0, v11 * v22, 1.0)), 0.0)
        for v11, v12, v22 in products]).astype(jnp.float32)
    combined = []
    for u, g, (kind, k) in zip(leaves, per_loss, parsed):
      if kind == "main":
        direction = 2 * (weights[k] * g[0] + (1 - weights[k]) * g[1 + k])
        u = rescaled(direction, jnp.sum(g, axis=0), gamma).astype(u.dtype)
      combined.append(u)
    inner_updates, inner_state = inner.update(jax.tree.unflatten(treedef, combined),
                                              state.inner_state, params, **extra_args)
    return inner_updates, MMParetoState(step=state.step + 1, cosines=cosines,
                                        fused_weights=weights, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mmpareto_state(opt_state: Any) -> MMParetoState | None:
  """The :class:`MMParetoState` inside an optimizer state, or None if there is none."""
  return find_state(opt_state, MMParetoState, "mmpareto")
