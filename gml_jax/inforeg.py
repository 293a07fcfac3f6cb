r"""InfoReg as an optax transform: information acquisition regulation (Huang, Wei, Yang, Hu,
"Adaptive Unimodal Regulation for Balanced Multimodal Information Acquisition", CVPR 2025).

While a modality's *prime learning window* is open, the modality that leads the batch has
its ``main:k`` gradients pulled back toward its parameters at the start of the epoch:

.. math::

   g_k \leftarrow g_k + \beta_k\,(\theta_k - \theta_k^{\mathrm{epoch\ start}}), \qquad
   \beta_k = c_k\, \exp(\tanh(\Delta_k)), \qquad
   \Delta_k = s_k - \mathrm{mean}_{j \ne k}\, s_j,

for :math:`\Delta_k > 0` (two modalities: only the leader, :math:`\Delta = s_0 - s_1`),
where :math:`s_k` is the batch's summed true-class probability of branch k (``scores``, as
for OGM-GE). The window comes from the trace of each modality's empirical Fisher
information: per epoch e, :math:`T_k(e) = \sum_{\text{steps}} \sum_{W} \mathrm{mean}(g_W^2)`
over the modality's kernels W (``main:k`` leaves of rank >= 2, the authors' convolution
and linear weights), from the gradients this transform receives. Before epoch e >= 1, with
H = ``history``:

.. math::

   r_k(e) = \frac{\bar T_k(e-1) - \bar T_k(e-2)}{\bar T_k(e-1)}, \qquad
   \bar T_k(e) = \tfrac{1}{H} \sum_{i=0}^{H-1} T_k(e - i)

(traces of epochs before 0 count as 0; :math:`r = 0` when :math:`\bar T = 0`), and the
window of modality k is open in epoch e while :math:`r_k(e) > \tau` (``threshold``); in
epoch 0 it is open (r = 1). ``window_modality=j`` takes every modality's window from
modality j's trace, as the authors' code does with the audio trace.

``docs/methods/inforeg.md`` compares this with the paper and the authors' code.

The epoch boundaries come from :func:`gml_jax.epochs.epoch_start` (called before every
epoch with ``params=``): it records the finished epoch's trace, opens or closes the windows
and takes the parameters as the new anchor. Without any call the run behaves as one long
epoch 0 anchored at the initial parameters.

Composition: the pull is added before ``inner``, so momentum, weight decay and Adam see
it (as in the authors' code, where it is added to ``.grad`` before ``optimizer.step()``).
Leaves labelled other than ``main:k`` pass unchanged. N >= 2 modalities.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from gml_jax.balancing import find_state
from gml_jax.labels import Labels, num_modalities, resolve_labels


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class InfoRegConfig:
  """InfoReg's hyper-parameters (static: part of the state's structure)."""

  strength: tuple
  threshold: float
  history: int
  window_modality: int | None


class InfoRegState(NamedTuple):
  """State of :func:`inforeg` (N modalities, H = ``history``).

  Attributes:
    epochs_started: int32, epoch hooks run so far (the current epoch is this − 1; 0 before
      the first, which is epoch 0 too).
    anchor: the parameters at the start of the current epoch (a tree like the params).
    trace: float32[N], the current epoch's trace so far (Σ over steps of Σ_W mean(g²)).
    history: float32[N, H + 1], the traces of the last H + 1 finished epochs, oldest first
      (zeros before the first).
    rates: float32[N], r_k of the current epoch (1 in epoch 0).
    open: bool[N], whether modality k's window is open in the current epoch.
    betas: float32[N], the last step's pull strengths β_k (0 where nothing was pulled).
    config: :class:`InfoRegConfig` (static).
    inner_state: state of the wrapped optimizer.
  """

  epochs_started: jax.Array
  anchor: Any
  trace: jax.Array
  history: jax.Array
  rates: jax.Array
  open: jax.Array
  betas: jax.Array
  config: InfoRegConfig
  inner_state: Any

  NEEDS = ("scores",)
  EPOCH_NEEDS = ("params",)
  METRICS = {"inforeg_beta": "inforeg_beta_{m}", "inforeg_rate": "inforeg_rate_{m}",  # noqa: RUF012
             "inforeg_window": "inforeg_window_{m}", "inforeg_trace": "inforeg_trace_{m}"}

  def train_metrics(self) -> dict:
    """The last step's β_k, this epoch's rates r_k and windows (1 open, 0 closed), and the
    last finished epoch's trace T_k."""
    return {"inforeg_beta": self.betas, "inforeg_rate": self.rates,
            "inforeg_window": self.open.astype(jnp.float32),
            "inforeg_trace": self.history[:, -1]}

  def epoch_start(self, *, params) -> "InfoRegState":
    """The state for the epoch about to begin (see the module doc)."""
    if jax.tree.structure(params) != jax.tree.structure(self.anchor):
      raise ValueError(
          "InfoReg epoch_start: params do not have the structure of the parameters the "
          f"optimizer was initialised with: got {jax.tree.structure(params)}, expected "
          f"{jax.tree.structure(self.anchor)}. With NNX, keep the optimizer state pure "
          "(tx.init(nnx.state(model, nnx.Param)), or gml_jax.make_train_step over "
          "gml_jax.nnx.wrap(model)): nnx.Optimizer's opt_state holds NNX variables.")
    first = self.epochs_started == 0
    history = jnp.where(first, self.history,
                        jnp.concatenate([self.history[:, 1:], self.trace[:, None]], axis=1))
    rates = jnp.where(first, jnp.ones_like(self.rates), information_rates(history))
    config = self.config
    window_rates = rates if config.window_modality is None else jnp.full_like(
        rates, rates[config.window_modality])
    return self._replace(
        epochs_started=self.epochs_started + 1,
        anchor=jax.tree.map(lambda p, a: jnp.asarray(p, a.dtype), params, self.anchor),
        trace=jnp.zeros_like(self.trace), history=history, rates=rates,
        open=window_rates > config.threshold)


def information_rates(history: jax.Array) -> jax.Array:
  """r_k = (mean of the last H traces − mean of the H before the last) / mean of the last H,
  from ``history`` float[N, H + 1] (oldest first); 0 where that mean is 0."""
  new = jnp.mean(history[:, 1:], axis=1)
  old = jnp.mean(history[:, :-1], axis=1)
  return jnp.where(new > 0, (new - old) / jnp.where(new > 0, new, 1.0), 0.0)


def pull_strengths(scores: jax.Array, strength: jax.Array, open_: jax.Array) -> jax.Array:
  """β_k = c_k exp(tanh(s_k − mean_{j≠k} s_j)) where that gap is > 0 and k's window is
  open, else 0 (equal scores: nobody is pulled)."""
  n = scores.shape[-1]
  gap = scores - (jnp.sum(scores) - scores) / (n - 1)
  return jnp.where((gap > 0) & open_, strength * jnp.exp(jnp.tanh(gap)), 0.0)


def _strengths(strength, n: int) -> tuple:
  values = tuple(strength) if isinstance(strength, (tuple, list)) else (strength,) * n
  if len(values) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and v >= 0 for v in values):
    raise ValueError(f"inforeg: strength must be a number >= 0 or one per modality ({n}); "
                     f"got {strength!r}.")
  return tuple(float(v) for v in values)


def inforeg(
    inner: optax.GradientTransformation,
    labels: Labels,
    *,
    strength: float | Sequence[float],
    threshold: float = 0.05,
    history: int = 10,
    window_modality: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer with InfoReg (Huang et al., CVPR 2025); see the module doc.

  ``update(grads, state, params, *, scores)`` takes ``scores[k]``, the batch's summed
  true-class probability of branch k (:func:`gml_jax.true_class_scores`), and the current
  ``params`` (the pull needs them). Call :func:`gml_jax.epochs.epoch_start` with
  ``params=`` before every epoch.

  Example (modality 0 leads by 2, its window is open: its gradient gains
  0.5·e^{tanh 2}·(θ − θ_start))::

    >>> import jax.numpy as jnp, optax
    >>> from gml_jax import epochs, inforeg
    >>> params = {'a': jnp.ones((1, 1)), 'b': jnp.ones((1, 1))}
    >>> tx = inforeg.inforeg(optax.sgd(-1.0), {'a': 'main:0', 'b': 'main:1'}, strength=0.5)
    >>> start = {'a': jnp.zeros((1, 1)), 'b': jnp.zeros((1, 1))}
    >>> state = epochs.epoch_start(tx.init(params), params=start)
    >>> grads = {'a': jnp.zeros((1, 1)), 'b': jnp.zeros((1, 1))}
    >>> updates, state = tx.update(grads, state, params, scores=jnp.array([5.0, 3.0]))
    >>> round(float(updates['a'][0, 0]), 4), float(updates['b'][0, 0])
    (1.3111, 0.0)

  Args:
    inner: the optimizer to wrap.
    labels: a tree like the parameters with ``"main:<k>"`` leaves (N >= 2 modalities; label
      a head you do not want pulled ``other``) and any other label of
      :func:`gml_jax.balanced_multimodal`, or a function of the parameters returning one.
    strength: c_k >= 0, one number for every modality or one per modality (the authors'
      CREMA-D recipe: 0.95 for audio, 0.1 for video).
    threshold: τ, the rate above which a window is open (authors: 0.05; ``-inf``: always
      open, a control for the window).
    history: H, the epochs of the traces' moving averages (authors: 10).
    window_modality: None (each modality's window from its own trace) or j (every window
      from modality j's trace; the authors' code uses the audio trace, j = 0 there).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an :class:`InfoRegState`.

  References:
    Huang et al., CVPR 2025, https://arxiv.org/abs/2503.18595
  """
  if not isinstance(threshold, (int, float)) or threshold != threshold:
    # Any real number: a negative one (or -inf) keeps every window open, a control.
    raise ValueError(f"inforeg: threshold must be a real number, got {threshold!r}.")
  if not (isinstance(history, int) and not isinstance(history, bool) and history >= 1):
    raise ValueError(f"inforeg: history must be an int >= 1, got {history!r}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    n = num_modalities(labels, params, fusion=False)
    if window_modality is not None and not (
        isinstance(window_modality, int) and 0 <= window_modality < n):
      raise ValueError(f"inforeg: window_modality must be None or a modality in [0, {n}); "
                       f"got {window_modality!r}.")
    config = InfoRegConfig(_strengths(strength, n), float(threshold), history, window_modality)
    return InfoRegState(
        epochs_started=jnp.zeros((), jnp.int32),
        anchor=jax.tree.map(jnp.asarray, params), trace=jnp.zeros((n,), jnp.float32),
        history=jnp.zeros((n, history + 1), jnp.float32), rates=jnp.ones((n,), jnp.float32),
        open=jnp.ones((n,), bool), betas=jnp.zeros((n,), jnp.float32), config=config,
        inner_state=inner.init(params))

  def update_fn(updates, state: InfoRegState, params=None, *, scores=None, **extra_args):
    if scores is None or params is None:
      raise ValueError("inforeg needs the branches' scores and the current parameters: "
                       "tx.update(grads, state, params, scores=...) with scores[k] the "
                       "batch's summed true-class probability of branch k.")
    n = state.trace.shape[0]
    scores = jnp.asarray(scores, jnp.float32)
    if scores.shape != (n,):
      raise ValueError(f"scores must have shape ({n},), one per modality; got {scores.shape}.")
    parsed = resolve_labels(labels, updates)
    betas = pull_strengths(scores, jnp.asarray(state.config.strength, jnp.float32), state.open)
    leaves, treedef = jax.tree.flatten(updates)
    param_leaves = treedef.flatten_up_to(params)
    anchor_leaves = treedef.flatten_up_to(state.anchor)
    trace = [jnp.zeros((), jnp.float32) for _ in range(n)]
    pulled = []
    for g, p, a, (kind, k) in zip(leaves, param_leaves, anchor_leaves, parsed):
      if kind == "main":
        if g.ndim >= 2:  # the authors' trace: convolution and linear weights only
          trace[k] = trace[k] + jnp.mean(jnp.square(g.astype(jnp.float32)))
        g = g + (betas[k] * (p - a)).astype(g.dtype)
      pulled.append(g)
    inner_updates, inner_state = inner.update(jax.tree.unflatten(treedef, pulled),
                                              state.inner_state, params, **extra_args)
    return inner_updates, state._replace(trace=state.trace + jnp.stack(trace), betas=betas,
                                         inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def inforeg_state(opt_state: Any) -> InfoRegState | None:
  """The :class:`InfoRegState` inside an optimizer state, or None if there is none."""
  return find_state(opt_state, InfoRegState, "inforeg")
