"""AGM as an optax transform: adaptive gradient modulation (Li, Li, Hu, Lei, Li, Zhou,
"Boosting Multi-modal Model Performance with Adaptive Gradient Modulation", ICCV 2023).

Every step measures each modality's own contribution to the fused prediction with Shapley
values over the subsets of modalities (extra forward passes in which the other modalities'
inputs are zeros), takes the mean cross-entropy s_k of that mono-modal output, and scales
the gradients of branch k by a coefficient that pulls the modalities' relative losses back
toward their running average. ``docs/methods/agm.md`` restates the method, where the paper,
the authors' code and BalanceBenchmark differ, and what is done here at each point.

Two pieces, usable apart:

* :func:`mono_modal_losses` (with :func:`mono_modal_outputs` and :func:`shapley_matrix`):
  the step's extra work, s_k from a model of :mod:`gml_jax.protocol` (one vmapped forward
  over the 2^N - 1 non-empty subsets of modalities, in eval mode);
* :func:`agm`: the transform; ``update(grads, state, params, *, mono_losses)``.

Labels are those of :func:`gml_jax.balanced_multimodal` (``"main:<k>"`` marks branch k's
parameters; every other label passes unchanged).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gml_jax.balancing import find_state
from gml_jax.labels import Labels, num_modalities, resolve_labels
from gml_jax.modulation import SCOPES, in_window
from gml_jax.protocol import as_functional, check_model, check_outputs

MIN_PROBABILITY = 1e-8  # a true-class probability below it counts as it (the authors' clamp)
MAX_LOSS = -math.log(MIN_PROBABILITY)


class AGMState(NamedTuple):
  """State of :func:`agm` (N = number of modalities).

  Attributes:
    step: int32, updates taken so far.
    mean_losses: float32[N], the running mean s̄_k of the mono-modal losses of every update
      so far (0 before the first; the authors' ``train_score``).
    losses: float32[N], the mono-modal losses s_k of the last update.
    ratios: float32[N], the ratios r_k of the last update's losses.
    target_ratios: float32[N], the ratios r̄_k of the running means it was compared with.
    coefficients: float32[N], the coefficients that scaled the last update's gradients (all
      1 outside the modulation window).
    inner_state: state of the wrapped optimizer.
  """

  step: jax.Array
  mean_losses: jax.Array
  losses: jax.Array
  ratios: jax.Array
  target_ratios: jax.Array
  coefficients: jax.Array
  inner_state: Any

  # The step protocol: keyword arguments of ``update``, and what train_metrics() returns.
  NEEDS = ("mono_losses",)
  METRICS = {"agm_mono_loss": "agm_mono_loss_{m}", "agm_ratio": "agm_ratio_{m}",  # noqa: RUF012
             "agm_target_ratio": "agm_target_ratio_{m}",
             "agm_coefficient": "agm_coefficient_{m}"}

  def train_metrics(self) -> dict:
    """What a train step reports of this state: the last update's losses, ratios and
    coefficients."""
    return {"agm_mono_loss": self.losses, "agm_ratio": self.ratios,
            "agm_target_ratio": self.target_ratios, "agm_coefficient": self.coefficients}


# --------------------------------------------------------------------------------------
# Shapley mono-modal outputs


def subsets(n: int) -> np.ndarray:
  """bool[2^n - 1, n]: every non-empty subset of n modalities, row s the binary digits of
  s + 1 (modality j present where bit j is set)."""
  if not isinstance(n, int) or n < 2:
    raise ValueError(f"subsets: need an integer number of modalities >= 2, got {n!r}.")
  codes = np.arange(1, 2 ** n)
  return (codes[:, None] >> np.arange(n)[None, :]) & 1 == 1


def shapley_matrix(n: int) -> np.ndarray:
  r"""float64[n, 2^n - 1]: the Shapley value of modality m as a linear combination of the
  outputs v(S) of the non-empty subsets S (rows of :func:`subsets`), with v(∅) := 0:

  .. math::  \phi_m = \sum_{S \subseteq M \setminus \{m\}} \frac{|S|!\,(n-|S|-1)!}{n!}
             \,\bigl(v(S \cup \{m\}) - v(S)\bigr)

  Taking v(∅) = 0 (as the authors do: their formulas have no empty-input term) makes the
  values add up to the full output, Σ_m φ_m = v(M). For two modalities
  φ_0 = (v({0}) + v({0, 1}) - v({1})) / 2.
  """
  rows = subsets(n)
  index = {tuple(r): s for s, r in enumerate(rows)}
  out = np.zeros((n, len(rows)))
  for m in range(n):
    others = [j for j in range(n) if j != m]
    for size in range(n):
      weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
      for chosen in itertools.combinations(others, size):
        with_m = tuple(j in chosen or j == m for j in range(n))
        out[m, index[with_m]] += weight
        if chosen:  # v(∅) = 0
          out[m, index[tuple(j in chosen for j in range(n))]] -= weight
  return out


def mono_modal_outputs(model: Any, variables: dict, inputs) -> jax.Array:
  """float32[N, B, C]: the Shapley mono-modal outputs φ_m of a model's fused logits.

  ``model`` follows :mod:`gml_jax.protocol` (Linen, or NNX, which is wrapped). The output
  v(S) of a subset S is the fused logits ŷ of ``model.apply(variables, inputs_S,
  train=False, cut=-1)`` where ``inputs_S`` keeps x_j for j in S and replaces the others by
  zeros (the authors' removal: zero inputs, in eval mode: BatchNorm running statistics). The
  2^N - 1 subsets run as one forward vmapped over the subsets; the result is combined with
  :func:`shapley_matrix` and carries no gradient (it only decides coefficients).

  Why zeros and not the protocol's ``drop``: ``drop`` replaces a modality's cross-modal
  signals by their training-split means, which exist only after training, and leaves the
  modality's own branch in ŷ; zeros remove the modality from every path, as the authors do.
  A zero input is not "no information" for a branch with biases or normalisation: its
  branch still emits a constant, which the differences v(S ∪ {m}) - v(S) then subtract.

  Args:
    model: the model (protocol call ``model(inputs, *, train, cut=-1, drop=None)``).
    variables: its variables ({"params": ..., plus batch_stats and other collections}).
    inputs: a tuple of N arrays, batch axis first.
  """
  model = as_functional(model)
  check_model(model, ("train", "cut"), "mono_modal_outputs")

  def fused_logits(kept):
    outputs = model.apply(variables, kept, train=False, cut=-1)
    return check_outputs(outputs, jnp.shape(kept[0])[0], "mono_modal_outputs")[0]

  return shapley_outputs(fused_logits, inputs)


def shapley_outputs(fused_logits, inputs) -> jax.Array:
  """float32[N, B, C]: the Shapley mono-modal outputs φ_m, from ``fused_logits``, a function
  of a tuple of N inputs -> the fused logits [B, C] of an evaluation-mode forward pass (what
  :func:`mono_modal_outputs` builds from a model; the library's step passes its own). The
  2^N - 1 subsets (the absent modalities' inputs zeros) run as one vmapped call."""
  inputs = tuple(inputs)
  n = len(inputs)
  if n < 2:
    raise ValueError(f"mono_modal_outputs: inputs must be a tuple of N >= 2 arrays, one per "
                     f"modality; got {n}.")
  masks = jnp.asarray(subsets(n))

  def subset_logits(mask):
    kept = tuple(jnp.where(mask[j], x, jnp.zeros_like(x)) for j, x in enumerate(inputs))
    return fused_logits(kept).astype(jnp.float32)

  values = jax.vmap(subset_logits)(masks)  # [2^N - 1, B, C]
  phi = jnp.einsum("ms,sbc->mbc", jnp.asarray(shapley_matrix(n), jnp.float32), values)
  return jax.lax.stop_gradient(phi)


def clamped_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """float[..., B]: -log p(true class), at most -log 1e-8 (the authors count a probability
  below 1e-8 as 1e-8), from logits [..., B, C] and int labels [B]."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  true = jnp.take_along_axis(log_probs, jnp.broadcast_to(
      labels[..., None], log_probs.shape[:-1] + (1,)), axis=-1)[..., 0]
  return jnp.minimum(-true, MAX_LOSS)


def mono_modal_losses(model: Any, variables: dict, inputs, labels: jax.Array) -> jax.Array:
  """float32[N]: s_k, the batch's mean clamped cross-entropy (:func:`clamped_cross_entropy`)
  of modality k's Shapley mono-modal output (:func:`mono_modal_outputs`): the
  ``mono_losses`` that :func:`agm` needs. Under data parallelism the mean is over the global
  batch when this runs inside the sharded step."""
  return _mean_losses(mono_modal_outputs(model, variables, inputs), labels)


def shapley_losses(fused_logits, inputs, labels: jax.Array) -> jax.Array:
  """:func:`mono_modal_losses` from a function ``fused_logits`` (see
  :func:`shapley_outputs`) instead of a model: the ``mono_losses`` of
  :mod:`gml_jax.extras`."""
  return _mean_losses(shapley_outputs(fused_logits, inputs), labels)


def _mean_losses(phi: jax.Array, labels: jax.Array) -> jax.Array:
  labels = jnp.asarray(labels)
  if labels.shape != phi.shape[1:2] or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"mono_modal_losses: labels must be int[B] with B = {phi.shape[1]}; got "
                     f"{labels.dtype} {labels.shape}.")
  return jnp.mean(clamped_cross_entropy(phi, labels), axis=-1)


# --------------------------------------------------------------------------------------
# The rule


def agm_ratios(losses: jax.Array) -> jax.Array:
  r"""r_k = exp(N/(N-1) · (mean_j s_j - s_k)) for losses float[N]: above 1 for a modality
  whose mono-modal loss is below the average (a modality that leads). Two modalities:
  r_0 = exp(s_1 - s_0), as in the authors' code."""
  n = losses.shape[-1]
  return jnp.exp(n / (n - 1) * (jnp.mean(losses, axis=-1, keepdims=True) - losses))


def agm_coefficients(ratios: jax.Array, target_ratios: jax.Array, alpha: float,
                     cap: float | None = 10.0) -> jax.Array:
  """k_k = exp(α · min(r̄_k - r_k, cap)): below 1 for a modality that leads more than it
  has on average (r_k > r̄_k), above 1 for one that lags more; ``cap`` None: no cap."""
  gap = target_ratios - ratios
  if cap is not None:
    gap = jnp.minimum(gap, cap)
  return jnp.exp(alpha * gap)


def _check_options(alpha, scope, window, cap, clip) -> None:
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f"agm: alpha must be a number > 0, got {alpha!r}.")
  if scope not in SCOPES:
    raise ValueError(f"agm: scope must be one of {SCOPES}, got {scope!r}.")
  if window is not None and (
      not isinstance(window, (tuple, list)) or len(window) != 2
      or not all(isinstance(v, int) and not isinstance(v, bool) for v in window)
      or not 0 <= window[0] <= window[1]):
    raise ValueError("agm: window must be None (every update) or (start, stop), integer "
                     f"update indices with 0 <= start <= stop; got {window!r}.")
  for name, value in (("cap", cap), ("clip", clip)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not value > 0):
      raise ValueError(f"agm: {name} must be None or a number > 0, got {value!r}.")


def _head_leaves(parsed, leaves) -> list[int]:
  """Indices of the leaves the clip watches: rank >= 2 leaves not labelled main:<k>."""
  return [i for i, ((kind, _), g) in enumerate(zip(parsed, leaves))
          if kind != "main" and jnp.ndim(g) >= 2]


def agm(
    inner: optax.GradientTransformation,
    labels: Labels,
    *,
    alpha: float,
    scope: str = "branch",
    window: tuple[int, int] | None = None,
    cap: float | None = 10.0,
    clip: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer with AGM, adaptive gradient modulation (Li et al., ICCV 2023).

  ``update(grads, state, params, *, mono_losses)`` takes ``mono_losses[k]`` = s_k, the
  batch's mean cross-entropy of modality k's Shapley mono-modal output
  (:func:`mono_modal_losses` computes it from your model). At update t (1-based), with
  s̄_k the mean of s_k over updates 1 … t-1 (0 at t = 1):

  .. math::
     r_k = e^{\frac{N}{N-1}(\bar s - s_k)}, \quad
     \bar r_k = e^{\frac{N}{N-1}(\overline{\bar s} - \bar s_k)}, \quad
     k_k = e^{\alpha \min(\bar r_k - r_k,\ \mathrm{cap})}

  (:math:`\bar s`, :math:`\overline{\bar s}`: the means over modalities), then
  :math:`\bar s_k \leftarrow \bar s_k (t-1)/t + s_k / t`. The ``main:k`` gradients
  (``scope="branch"``: every leaf; ``"kernels"``: leaves of rank >= 2, the authors'
  BalanceBenchmark port's "weights, not biases") are multiplied by k_k inside ``window``;
  every other leaf passes unchanged. A modality that leads its partners by more than it has
  on average is slowed, one that lags by more is sped up. With ``clip``, the authors' guard
  follows: if any entry of the head's gradient (the rank >= 2 leaves not labelled
  ``main:<k>``) exceeds ``clip`` in absolute value, the whole gradient is rescaled to global
  norm at most ``clip`` (they use 1 on CREMA-D and AV-MNIST, 5 on UR-Funny).

  Composition: the scaling happens before ``inner``, so momentum and weight decay see the
  scaled gradient, as in the authors' code (SGD, momentum 0.9, weight decay 1e-4). Under
  Adam a coefficient that changes slowly cancels in the normalisation (only its step-to-step
  changes survive): use SGD to get the method. Chain gradient clipping inside ``inner``;
  put :func:`agm` outside :func:`gml_jax.balanced_multimodal` (``agm(balanced_multimodal(
  sgd, …), labels, …)``) to report conditional learning speeds on the modulated updates;
  combining it with another re-weighting of the same leaves (``ogm_ge``) is allowed but
  then neither method is what its paper describes.

  Example (two modalities; the first update compares with running means of 0, r̄ = 1)::

    >>> import jax.numpy as jnp, optax, gml_jax.agm as agm_lib
    >>> params = {'a': jnp.ones(2), 'b': jnp.ones(2)}
    >>> tx = agm_lib.agm(optax.sgd(1.0), {'a': 'main:0', 'b': 'main:1'}, alpha=1.0)
    >>> state = tx.init(params)
    >>> grads = {'a': jnp.ones(2), 'b': jnp.ones(2)}
    >>> updates, state = tx.update(grads, state, params, mono_losses=jnp.array([0.5, 1.0]))
    >>> [round(float(c), 4) for c in state.coefficients]  # exp(1 - e^{±0.5})
    [0.5227, 1.4821]

  Args:
    inner: the optimizer to wrap.
    labels: a tree like the parameters with leaves ``"main:<k>"`` (N >= 2 modalities) and
      anything else :func:`gml_jax.balanced_multimodal` accepts, or a function returning one.
    alpha: α, the strength of the modulation (> 0). Authors: 1.5 CREMA-D, 2.5 AV-MNIST,
      4.0 UR-Funny; BalanceBenchmark 0.1.
    scope: ``"branch"`` (every ``main:k`` leaf) or ``"kernels"`` (its leaves of rank >= 2).
    window: ``(start, stop)``: modulate updates start … stop - 1 (0-based); None: every
      update. Outside it the losses, ratios and running means are still updated.
    cap: the cap on r̄_k - r_k (authors: 10 on CREMA-D and AVE, 7 on UR-Funny, none on
      AV-MNIST; BalanceBenchmark 7); None: no cap.
    clip: the head-gradient guard's threshold and norm (None: no guard).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an :class:`AGMState`.

  References:
    Li et al., ICCV 2023, https://arxiv.org/abs/2308.07686
  """
  _check_options(alpha, scope, window, cap, clip)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    n = num_modalities(labels, params, fusion=False)
    if clip is not None and not _head_leaves(resolve_labels(labels, params),
                                             jax.tree.leaves(params)):
      raise ValueError("agm: clip watches the head's gradient, the leaves of rank >= 2 not "
                       "labelled 'main:<k>'; these labels have none. Label the fusion head "
                       "'other' (or 'fusion:...'), or pass clip=None.")
    ones = jnp.ones((n,), jnp.float32)
    return AGMState(step=jnp.zeros((), jnp.int32), mean_losses=jnp.zeros((n,), jnp.float32),
                    losses=jnp.zeros((n,), jnp.float32), ratios=ones, target_ratios=ones,
                    coefficients=ones, inner_state=inner.init(params))

  def update_fn(updates, state: AGMState, params=None, *, mono_losses=None, **extra_args):
    if mono_losses is None:
      raise ValueError("agm needs the modalities' mono-modal losses: tx.update(grads, state, "
                       "params, mono_losses=...) with mono_losses[k] the batch's mean "
                       "cross-entropy of modality k's Shapley output "
                       "(gml_jax.agm.mono_modal_losses).")
    n = state.mean_losses.shape[0]
    losses = jnp.asarray(mono_losses, jnp.float32)
    if losses.shape != (n,):
      raise ValueError(f"agm: mono_losses must have shape ({n},), one per modality; got "
                       f"{losses.shape}.")
    parsed = resolve_labels(labels, updates)
    ratios = agm_ratios(losses)
    target = agm_ratios(state.mean_losses)
    active = in_window(state.step, window)
    coefficients = jnp.where(active, agm_coefficients(ratios, target, alpha, cap), 1.0)
    leaves, treedef = jax.tree.flatten(updates)
    scaled = [g * coefficients[k].astype(g.dtype)
              if kind == "main" and (scope == "branch" or g.ndim >= 2) else g
              for g, (kind, k) in zip(leaves, parsed)]
    if clip is not None:
      head = _head_leaves(parsed, scaled)
      peak = jnp.max(jnp.stack([jnp.max(jnp.abs(scaled[i])) for i in head]))
      norm = optax.tree.norm(scaled)
      factor = jnp.where((peak > clip) & (norm > clip), clip / jnp.where(norm > 0, norm, 1), 1)
      scaled = [g * factor.astype(g.dtype) for g in scaled]
    t = (state.step + 1).astype(jnp.float32)
    mean_losses = state.mean_losses * (t - 1) / t + losses / t
    inner_updates, inner_state = inner.update(jax.tree.unflatten(treedef, scaled),
                                              state.inner_state, params, **extra_args)
    return inner_updates, AGMState(step=state.step + 1, mean_losses=mean_losses, losses=losses,
                                   ratios=ratios, target_ratios=target,
                                   coefficients=coefficients, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def agm_state(opt_state: Any) -> AGMState | None:
  """The :class:`AGMState` inside an optimizer state, or None if there is none."""
  return find_state(opt_state, AGMState, "agm")
