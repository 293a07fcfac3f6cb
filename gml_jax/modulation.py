"""OGM-GE as an optax transform: on-the-fly gradient modulation with generalisation
enhancement (Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly
Gradient Modulation", CVPR 2022).

At every step (or every step of a window) the modality whose branch fits the batch better is
slowed down: its ``main:k`` gradients (all of them, or its kernels only) are scaled by a
coefficient below 1 that grows with its lead, and (with ``noise``) Gaussian noise is added to
every branch's modulated gradients. ``docs/methods/ogm_ge.md`` restates the method
and what in the published method is ambiguous, with how each point is settled here.

Labels are those of :func:`gml_jax.balanced_multimodal` (``"main:<k>"`` marks branch k's
parameters; every other label passes unchanged), so both transforms read the same tree.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gml_jax.balancing import find_state
from gml_jax.labels import Labels, num_modalities, resolve_labels

NOISE_FLOOR = 1e-8  # added to the noise scale so that a zero gradient still gets some
SCOPES = ("branch", "kernels")


class OGMState(NamedTuple):
  """State of :func:`ogm_ge` (N = number of modalities).

  Attributes:
    step: int32, updates taken so far (the noise of step t is drawn from (seed, t)).
    ratios: float32[N], the discrepancy ratios ρ_k of the last step.
    coefficients: float32[N], the coefficients k_k that scaled the last step's gradients
      (all 1 for a step outside the modulation window).
    inner_state: state of the wrapped optimizer.
  """

  step: jax.Array
  ratios: jax.Array
  coefficients: jax.Array
  inner_state: Any

  # The step protocol (gml_jax.extras): update needs the branches' scores; its metrics.
  NEEDS = ("scores",)
  METRICS = {"ogm_ratio": "ogm_ratio_{m}", "ogm_coefficient": "ogm_coefficient_{m}"}

  def train_metrics(self) -> dict:
    """What a train step reports of this state: the last update's ratios and coefficients."""
    return {"ogm_ratio": self.ratios, "ogm_coefficient": self.coefficients}


def discrepancy_ratios(scores: jax.Array) -> jax.Array:
  """ρ_k = s_k / mean_{j≠k} s_j for scores float[N] (two modalities: s_0/s_1 and s_1/s_0).

  A modality whose others all score 0 gets ρ = 1 (no modulation), as does an all-zero batch.
  """
  n = scores.shape[-1]
  others = (jnp.sum(scores, axis=-1, keepdims=True) - scores) / (n - 1)
  return jnp.where(others > 0, scores / jnp.where(others > 0, others, 1.0), 1.0)


def modulation_coefficients(ratios: jax.Array, alpha: float, continuous: bool = False):
  """k_k = 1 - tanh(α ρ_k) where ρ_k > 1, else 1 (the paper's Eq. 10); with ``continuous``,
  1 - tanh(α (ρ_k - 1)), which tends to 1 as ρ_k approaches 1 from above."""
  lead = ratios - 1.0 if continuous else ratios
  return jnp.where(ratios > 1.0, 1.0 - jnp.tanh(alpha * lead), 1.0)


def noise_scale(gradient: jax.Array) -> jax.Array:
  """The standard deviation of GE's noise for one leaf: the unbiased (n - 1) standard
  deviation of its raw gradient entries, as ``torch.std`` computes it in the authors' code,
  plus :data:`NOISE_FLOOR` (a one-entry leaf, which has none, gets the floor alone)."""
  if gradient.size < 2:
    return jnp.full((), NOISE_FLOOR, gradient.dtype)
  return jnp.std(gradient, ddof=1) + NOISE_FLOOR


def in_window(step: jax.Array, window: tuple[int, int] | None) -> jax.Array:
  """bool: whether update ``step`` (0-based) modulates: ``window`` = (start, stop) updates,
  start included, stop excluded; None: every update."""
  if window is None:
    return jnp.ones((), bool)
  start, stop = window
  return (step >= start) & (step < stop)


def _check_window(window) -> None:
  if window is None:
    return
  if (not isinstance(window, (tuple, list)) or len(window) != 2
      or not all(isinstance(v, int) and not isinstance(v, bool) for v in window)
      or not 0 <= window[0] <= window[1]):
    raise ValueError("ogm_ge: window must be None (every update) or (start, stop), integer "
                     f"update indices with 0 <= start <= stop; got {window!r}.")


def ogm_ge(
    inner: optax.GradientTransformation,
    labels: Labels,
    *,
    alpha: float,
    noise: bool = True,
    seed: int = 0,
    continuous: bool = False,
    scope: str = "branch",
    window: tuple[int, int] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer with OGM-GE (Peng et al., CVPR 2022).

  ``update(grads, state, params, *, scores)`` takes ``scores[k]``: the batch's sum over
  examples of the softmax probability that branch k's logits give the true class (the
  whole global batch under data parallelism; :func:`gml_jax.steps.make_train_step`
  computes it). With the discrepancy ratio

  .. math::  \rho_k = s_k \,/\, \mathrm{mean}_{j \ne k}\, s_j

  (two modalities: :math:`\rho_0 = s_0 / s_1`, :math:`\rho_1 = s_1 / s_0`, as published),
  the modulated ``main:k`` gradients are multiplied by :math:`1 - \tanh(\alpha \rho_k)`
  where :math:`\rho_k > 1` (so for two modalities only the leading one) and pass unchanged
  otherwise. With ``noise`` every modulated leaf then gets Gaussian noise, not scaled by the
  coefficient, whose standard deviation is the unbiased one of the leaf's raw gradient
  entries (:func:`noise_scale`, as in the authors' code). Which leaves are modulated:
  ``scope="branch"``, every ``main:k`` leaf; ``scope="kernels"``, the ``main:k`` leaves of
  rank >= 2 (convolution and dense kernels; not biases or normalisation scales: the
  authors modulate their encoders' 4-D convolution kernels, and a 5-D video kernel counts
  too). Label a head you want left alone ``other``. Every other leaf (fusion layers,
  ``other``) passes unchanged. Outside ``window`` nothing is scaled or noised (the ratios
  are still computed and kept in the state). Everything happens before ``inner``, so
  momentum, weight decay and Adam see the modulated gradient, as in the authors' code.

  Example (modality 0 fits the batch twice as well, so its gradient is damped)::

    >>> import jax.numpy as jnp, optax, gml_jax
    >>> params = {'a': jnp.ones(2), 'b': jnp.ones(2)}
    >>> tx = gml_jax.ogm_ge(optax.sgd(1.0), {'a': 'main:0', 'b': 'main:1'}, alpha=0.5,
    ...                     noise=False)
    >>> state = tx.init(params)
    >>> grads = {'a': jnp.ones(2), 'b': jnp.ones(2)}
    >>> updates, state = tx.update(grads, state, params, scores=jnp.array([6.0, 3.0]))
    >>> [round(float(u[0]), 4) for u in (updates['a'], updates['b'])]  # -(1 - tanh(0.5*2))
    [-0.2384, -1.0]

  Args:
    inner: the optimizer to wrap.
    labels: a tree like the parameters with leaves ``"main:<k>"`` (branch k's parameters,
      N >= 2 modalities) and anything else that :func:`gml_jax.balanced_multimodal` accepts
      (``"fusion:<k>"``, ``"fusion:shared"``, ``"other"``), or a function of the parameters
      that returns one.
    alpha: α, the strength of the modulation (> 0).
    noise: add the generalisation-enhancement noise (OGM-GE); False: OGM alone.
    seed: seed of the noise (the noise of step t is a function of (seed, t)).
    continuous: use 1 - tanh(α (ρ - 1)) instead of the paper's 1 - tanh(α ρ).
    scope: ``"branch"`` (every ``main:k`` leaf) or ``"kernels"`` (its leaves of rank >= 2).
    window: ``(start, stop)``: modulate updates start, ..., stop - 1 only (0-based update
      counts; the authors' epochs [0, 50] of 100 are ``(0, 51 * steps_per_epoch)``); None:
      every update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an :class:`OGMState`.

  References:
    Peng et al., CVPR 2022, https://arxiv.org/abs/2203.15332
  """
  if not alpha > 0:
    raise ValueError(f"alpha must be a number > 0, got {alpha!r}.")
  if scope not in SCOPES:
    raise ValueError(f"ogm_ge: scope must be one of {SCOPES}, got {scope!r}.")
  _check_window(window)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    n = num_modalities(labels, params, fusion=False)
    return OGMState(step=jnp.zeros((), jnp.int32), ratios=jnp.ones((n,), jnp.float32),
                    coefficients=jnp.ones((n,), jnp.float32), inner_state=inner.init(params))

  def update_fn(updates, state: OGMState, params=None, *, scores=None, **extra_args):
    if scores is None:
      raise ValueError("ogm_ge needs the branches' scores: tx.update(grads, state, params, "
                       "scores=...) with scores[k] the batch's summed true-class probability "
                       "of branch k.")
    n = state.ratios.shape[0]
    scores = jnp.asarray(scores, jnp.float32)
    if scores.shape != (n,):
      raise ValueError(f"scores must have shape ({n},), one per modality; got {scores.shape}.")
    parsed = resolve_labels(labels, updates)
    ratios = discrepancy_ratios(scores)
    active = in_window(state.step, window)
    coefficients = jnp.where(active, modulation_coefficients(ratios, alpha, continuous), 1.0)
    leaves, treedef = jax.tree.flatten(updates)
    step_key = jax.random.fold_in(jax.random.key(seed), state.step)
    modulated = []
    for i, (g, (kind, k)) in enumerate(zip(leaves, parsed)):
      if kind == "main" and (scope == "branch" or g.ndim >= 2):
        scaled = g * coefficients[k].astype(g.dtype)
        if noise:
          drawn = jax.random.normal(jax.random.fold_in(step_key, i), g.shape, g.dtype)
          scaled = scaled + jnp.where(active, noise_scale(g), 0).astype(g.dtype) * drawn
        g = scaled
      modulated.append(g)
    inner_updates, inner_state = inner.update(jax.tree.unflatten(treedef, modulated),
                                              state.inner_state, params, **extra_args)
    return inner_updates, OGMState(step=state.step + 1, ratios=ratios,
                                   coefficients=coefficients, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ogm_state(opt_state: Any) -> OGMState | None:
  """The :class:`OGMState` inside an optimizer state, or None if there is none."""
  return find_state(opt_state, OGMState, "ogm_ge")
