"""Conditional utilization rate (spec §4): how much each branch gains from the others.

A(f_k) is the test accuracy of branch k's prediction ŷ_k with every modality. A(f_k^{-j})
is the same with modality j's input to the fusion layers removed: in every fusion layer,
what is computed from j is replaced by its mean over the training split (one pass over the
training data with the trained model in eval mode): MMTM's squeeze vector of j, or the
signal of every :class:`gml_jax.CrossModalCut` whose sources include j. Then

    u(m_j | m_k) = (A(f_k) - A(f_k^{-j})) / A(f_k),    d_util = u(m_1|m_0) - u(m_0|m_1).

The paper says d_util lies in [-1, 1]; that holds only when removing a modality never
helps. Rates are reported as measured, negative values included.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gml_jax.fusion import TRAIN_MEANS
from gml_jax.protocol import as_functional, check_model, check_outputs


def _weight(batch: dict) -> jax.Array:
  return batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))


class _Passes(NamedTuple):
  batch_sums: Callable  # (variables, batch) -> (sums of the droppable signals, weight)
  correct: Callable  # (variables, batch, drop) -> (hits of ŷ, hits per branch, weight,
  #                                                  fingerprint of each branch's logits)


def _make_passes(model) -> _Passes:
  @jax.jit
  def batch_sums(variables, batch):
    _, captured = model.apply(
        variables, tuple(batch["inputs"]), train=False, mutable=[TRAIN_MEANS]
    )
    w = _weight(batch)
    sums = jax.tree.map(lambda s: jnp.tensordot(w, s.astype(jnp.float32), axes=(0, 0)),
                        captured.get(TRAIN_MEANS, {}))
    return sums, jnp.sum(w)

  @jax.jit
  def correct(variables, batch, drop):
    logits, branch_logits = check_outputs(
        model.apply(variables, tuple(batch["inputs"]), train=False, drop=drop),
        batch["label"].shape[0], "conditional_utilization")
    w = _weight(batch)
    hit = lambda z: (jnp.argmax(z, axis=-1) == batch["label"]).astype(jnp.float32)
    # A fingerprint of every branch's logits: equal for two drops that change the same thing.
    prints = jnp.sum(branch_logits.astype(jnp.float32) * w[None, :, None], axis=(1, 2))
    return (jnp.sum(hit(logits) * w), jnp.sum(hit(branch_logits) * w, axis=-1), jnp.sum(w),
            prints)

  return _Passes(batch_sums, correct)


# The passes of the last few Linen models, each with the model it belongs to (so that its id
# stays its own): measuring at every epoch end compiles them once, not once per call.
_LINEN_PASSES: collections.OrderedDict[int, tuple[Any, _Passes]] = collections.OrderedDict()


def _passes(model) -> _Passes:
  """The compiled passes of ``model`` (Linen or NNX), its variables an argument."""
  if not isinstance(model, nn.Module):  # an NNX model: its wrapper is made per call
    return _make_passes(as_functional(model))
  if id(model) not in _LINEN_PASSES:
    _LINEN_PASSES[id(model)] = (model, _make_passes(model))
    while len(_LINEN_PASSES) > 4:
      _LINEN_PASSES.popitem(last=False)
  return _LINEN_PASSES[id(model)][1]


def training_means(model: nn.Module, variables: dict, batches: Iterable[dict]) -> Any:
  """The mean over ``batches`` (the training split, eval mode) of every signal that a
  :class:`gml_jax.CrossModalCut` (or MMTM, for its squeeze vectors) can drop.

  Returns the ``train_means`` collection that the cuts read when ``drop`` is given.
  ``model`` follows :mod:`gml_jax.protocol`; batches are ``{"inputs": (x_0, ...),
  "label": ...}`` with an optional ``"mask"`` (0: padding, left out of the means).
  """
  as_functional(model)  # a TypeError for what is neither Linen nor NNX
  batch_sums = _passes(model).batch_sums
  total, count = None, 0.0
  for batch in batches:
    sums, n = batch_sums(variables, batch)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    count += float(n)
  if total is None or count == 0:
    raise ValueError("training_means needs at least one non-empty batch of training data.")
  if not jax.tree.leaves(total):
    raise ValueError(
        "training_means: the model has no signal to drop. Put a gml_jax.CrossModalCut (or "
        "gml_jax.nnx.CrossModalCut) on each cross-modal signal and pass it `drop`, or use MMTM.")
  return jax.tree.map(lambda s: s / count, total)


@dataclasses.dataclass
class Utilization:
  """Conditional utilization rates of an N-modality model.

  Attributes:
    accuracy: accuracy of the fused prediction ŷ with every modality.
    branch_accuracy: float[N], A(f_k).
    ablated_accuracy: float[N, N], entry [j, k] = A(f_k^{-j}): branch k with modality j's
      squeeze replaced by its training mean (diagonal: NaN).
    rates: float[N, N], entry [j, k] = u(m_j | m_k) (diagonal: NaN).
    notes: warnings about the measurement (also issued with ``warnings.warn``): two rates
      of a branch that are equal because one cut carries both sources.
  """

  accuracy: float
  branch_accuracy: np.ndarray
  ablated_accuracy: np.ndarray
  rates: np.ndarray
  notes: Sequence[str] = ()

  @property
  def d_util(self) -> float:
    """u(m_1|m_0) - u(m_0|m_1); defined for two modalities."""
    if self.rates.shape[0] != 2:
      raise ValueError("d_util is defined for two modalities.")
    return float(self.rates[1, 0] - self.rates[0, 1])

  def as_dict(self) -> dict:
    """Flat, JSON-ready values with names like ``u(m1|m0)``. A rate is undefined (None)
    when its branch has accuracy 0; so is d_util then."""
    n = len(self.branch_accuracy)
    defined = lambda x: float(x) if np.isfinite(x) else None
    out = {"accuracy": float(self.accuracy)}
    for k in range(n):
      out[f"branch_{k}_accuracy"] = float(self.branch_accuracy[k])
    for k in range(n):
      for j in range(n):
        if j != k:
          out[f"u(m{j}|m{k})"] = defined(self.rates[j, k])
    if n == 2:
      out["d_util"] = defined(self.d_util)
    return out


def conditional_utilization(
    model: nn.Module,
    variables: dict,
    train_batches: Iterable[dict],
    test_batches: Iterable[dict],
    baseline: tuple[float, Sequence[float]] | None = None,
) -> Utilization:
  """Measures u(m_j | m_k) for every pair of modalities (spec §4).

  With N > 2 modalities each source needs its own cut: a cut on a signal computed from
  several modalities (e.g. a projection of the concatenated neighbours) is dropped when any
  of them is, so u(m_i|m_k) = u(m_j|m_k) by construction. That is detected (dropping m_i
  and m_j give branch k the very same outputs) and reported in ``Utilization.notes`` and
  with ``warnings.warn``.

  Args:
    model: a Linen or NNX model following :mod:`gml_jax.protocol` (its call takes
      ``drop``; ``cut`` is not needed here), whose fusion layers drop through
      :class:`gml_jax.CrossModalCut` pieces or MMTM.
    variables: the trained model's variables (params and statistics, e.g.
      ``TrainState.variables``).
    train_batches: the training split (for the mean squeeze vectors).
    test_batches: the split to measure accuracies on; iterated N + 1 times (N with
      ``baseline``).
    baseline: (accuracy of ŷ, A(f_k) per branch) with every modality, when already
      measured on ``test_batches`` (e.g. by the evaluation that reported them): skips that
      pass.
  """
  check_model(as_functional(model), ("train", "drop"), "conditional_utilization")
  means = training_means(model, variables, train_batches)
  with_means = {**variables, TRAIN_MEANS: means}
  test_batches = list(test_batches)
  if not test_batches:
    raise ValueError("conditional_utilization needs at least one batch of test data.")
  n = len(test_batches[0]["inputs"])
  correct = _passes(model).correct

  def accuracies(drop):
    fused, branches, count, prints = 0.0, np.zeros(n), 0.0, []
    for batch in test_batches:
      f, b, c, p = correct(with_means, batch, drop)
      fused, branches, count = fused + float(f), branches + np.asarray(b), count + float(c)
      prints.append(np.asarray(p))
    return fused / count, branches / count, np.stack(prints)

  if baseline is None:
    accuracy, branch_accuracy, _ = accuracies(jnp.zeros(n, bool))
  else:
    accuracy, branch_accuracy = float(baseline[0]), np.asarray(baseline[1], np.float64)
  ablated = np.full((n, n), np.nan)
  prints = []
  for j in range(n):
    _, without_j, fingerprint = accuracies(jnp.arange(n) == j)
    ablated[j] = np.where(np.arange(n) == j, np.nan, without_j)
    prints.append(fingerprint)
  with np.errstate(divide="ignore", invalid="ignore"):
    rates = (branch_accuracy[None, :] - ablated) / branch_accuracy[None, :]
  notes = _shared_cut_notes(prints)
  for note in notes:
    warnings.warn(note, stacklevel=2)
  return Utilization(accuracy, branch_accuracy, ablated, rates, tuple(notes))


def _shared_cut_notes(prints: list[np.ndarray]) -> list[str]:
  """Sentences for pairs of rates u(m_i|m_k) = u(m_j|m_k) that are equal because dropping
  m_i or m_j gave branch k the very same logits (``prints[j]``: [batches, N] fingerprints of
  every branch's logits with m_j dropped)."""
  n, notes = len(prints), []
  for k in range(n):
    for i in range(n):
      for j in range(i + 1, n):
        if k not in (i, j) and np.array_equal(prints[i][:, k], prints[j][:, k]):
          notes.append(
              f"u(m{i}|m{k}) and u(m{j}|m{k}) are equal because dropping m{i} or m{j} gives "
              f"branch {k} the very same outputs: one cut carries both (a CrossModalCut over "
              f"a signal computed from several modalities, dropped when any source is). To "
              f"measure each source, compute its signal apart and give it its own cut with "
              f"sources=({i},), sources=({j},).")
  return notes
