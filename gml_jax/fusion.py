"""The cut for any fusion (:class:`CrossModalCut`) and MMTM fusion (Joze et al., CVPR 2020)
built on it.

Balanced multi-modal learning needs two substitutions in a fusion layer, chosen by traced
arguments so that one compiled function handles every mode:

* ``cut=k`` (a re-balancing step for branch k, spec §3): the cross-modal signal entering
  branch k is replaced by its running mean over earlier training calls;
* ``drop[j]=True`` (the conditional utilization rate, spec §4): a signal computed from
  modality j is replaced by its mean over the training split.

:class:`CrossModalCut` does both for any signal a user's fusion computes (a FiLM
scale-and-shift, a gate, MMTM's excitation); MMTM uses it for its excitations (cut) and its
squeeze vectors (drop).

Collections:

* ``fusion_stats`` (:data:`FUSION_STATS`): ``running_mean`` and ``running_count`` of each
  cut, updated only by training calls (``train=True`` with the collection mutable) in which
  the signal was computed normally; evaluation never moves them. Model state: keep it with
  the parameters and label it like them (the train steps freeze it with its group).
* ``train_means`` (:data:`TRAIN_MEANS`): ``train_mean`` of each cut that has sources, the
  signal's mean over the training split; made by :func:`gml_jax.training_means` (while the
  collection is mutable a call writes the batch's signals there instead) and given with the
  variables when ``drop`` is. Not model state: it is measured after training.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

FUSION_STATS = "fusion_stats"
"""The collection of the running means that a re-balancing step substitutes (model state)."""
TRAIN_MEANS = "train_means"
"""The collection of training-split means that ``drop`` substitutes (spec §4)."""


def spatial_mean(x: jax.Array) -> jax.Array:
  """Mean over every axis but the first (batch) and the last (channels)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def substitute(signal: jax.Array, constant: jax.Array, where: jax.Array) -> jax.Array:
  """``signal`` [B, ...] with every example replaced by ``constant`` [...] where ``where``
  (a traced bool scalar) holds: the one substitution both switches make."""
  return jnp.where(where, jnp.asarray(constant).astype(signal.dtype)[None], signal)


def check_switches(owner: str, cut, drop, num_modalities: int | None = None) -> None:
  """Shape checks of the ``cut`` and ``drop`` switches, with messages naming ``owner``."""
  if jnp.ndim(cut) != 0:
    raise ValueError(f"{owner}: `cut` must be an int32 scalar (the re-balanced branch, -1 for "
                     f"none); got shape {jnp.shape(cut)}.")
  if drop is not None and (jnp.ndim(drop) != 1 or (
      num_modalities is not None and jnp.shape(drop)[0] != num_modalities)):
    expected = f"[{num_modalities}]" if num_modalities is not None else "[N]"
    raise ValueError(f"{owner}: `drop` must be a bool vector {expected}, one entry per "
                     f"modality; got shape {jnp.shape(drop)}.")


class CrossModalCut(nn.Module):
  """The cut for any fusion: put it on the cross-modal signal entering branch ``branch``.

  Wherever a fusion computes something from the other modalities that enters branch k (a
  FiLM generator's scale and shift, a gate, MMTM's excitation), pass it through a
  ``CrossModalCut(branch=k)`` before it is used::

    film = nn.Dense(2 * width, name="film_0")(h1)                  # from modality 1 ...
    film = gml_jax.CrossModalCut(branch=0, name="cut_0")(           # ... into branch 0
        film, train=train, cut=cut, drop=drop)
    h0 = h0 * (1 + film[:, :width]) + film[:, width:]

  In a normal training call the signal passes unchanged and its running mean (the mean of
  the batch means of earlier training calls) is updated; in a re-balancing step for this
  branch (``cut == branch``) the running mean replaces it, so the branch gets nothing from
  the other modalities, and the mean does not move. With ``drop[j]`` for a modality j in
  ``sources``, the signal's training-split mean replaces it (the utilization rate).

  Label the cut like the fusion parameters into the branch (``fusion:<branch>``): its
  running means are frozen with that group. The library's steps do the freezing; a
  hand-written step uses :func:`gml_jax.keep_frozen`.

  Attributes:
    branch: the branch k that the signal enters (the ``cut`` value that cuts it); None: a
      signal that is never cut (e.g. MMTM's squeeze vectors).
    sources: the modalities the signal is computed from; ``drop`` of any of them
      substitutes its training-split mean. None (default): every modality but ``branch``;
      ``()``: never dropped.
  """

  branch: int | None = None
  sources: Sequence[int] | None = None

  @nn.compact
  def __call__(self, signal: jax.Array, *, train: bool, cut: jax.Array | int = -1,
               drop: jax.Array | None = None) -> jax.Array:
    """The signal [B, ...] (batch first), or its substitute.

    Args:
      signal: the cross-modal signal, batch axis first.
      train: whether this is a training call (only those update the running mean).
      cut: int32 scalar, the branch a re-balancing step cuts; -1 (default) for none.
      drop: bool[N] or None; True for the modalities whose input is removed.
    """
    if jnp.ndim(signal) < 1:
      raise ValueError(f"CrossModalCut {self.path}: the signal must have a batch axis first "
                       f"([B, ...]); got shape {jnp.shape(signal)}.")
    check_switches(f"CrossModalCut {self.path}", cut, drop)
    used = signal
    if self.sources != ():
      if self.is_mutable_collection(TRAIN_MEANS) and not self.is_initializing():
        self.put_variable(TRAIN_MEANS, "train_mean", signal)  # collected by training_means
      sources = self.sources
      if drop is not None and sources is None:
        sources = [j for j in range(jnp.shape(drop)[0]) if j != self.branch]
      if drop is not None and sources:
        if not self.has_variable(TRAIN_MEANS, "train_mean"):
          raise ValueError(
              f"CrossModalCut {self.path}: `drop` needs the '{TRAIN_MEANS}' collection "
              f"(train_mean: float{list(signal.shape[1:])}); compute it with "
              "gml_jax.training_means.")
        dropped = jnp.any(jnp.asarray(drop)[jnp.asarray(sources)])
        used = substitute(used, self.get_variable(TRAIN_MEANS, "train_mean"), dropped)
    if self.branch is not None:
      mean = self.variable(FUSION_STATS, "running_mean", jnp.zeros, signal.shape[1:], jnp.float32)
      count = self.variable(FUSION_STATS, "running_count", jnp.zeros, (), jnp.float32)
      is_cut = jnp.asarray(cut) == self.branch
      # The mean of *earlier* calls replaces the signal, before this call could update it.
      used = substitute(used, mean.value, is_cut)
      if train and self.is_mutable_collection(FUSION_STATS) and not self.is_initializing():
        new_count = count.value + 1.0
        new_mean = mean.value + (jnp.mean(signal, axis=0) - mean.value) / new_count
        mean.value = jnp.where(is_cut, mean.value, new_mean)
        count.value = jnp.where(is_cut, count.value, new_count)
    return used


class MMTM(nn.Module):
  """Multimodal transfer module for N >= 2 channels-last feature maps.

  Attributes:
    ratio: squeeze ratio; the shared layer maps Σ C_k to int(2 Σ C_k / ratio) units.
  """

  ratio: float = 4

  @nn.compact
  def __call__(
      self,
      features: Sequence[jax.Array],
      *,
      train: bool,
      cut: jax.Array | int = -1,
      drop: jax.Array | None = None,
  ) -> tuple[jax.Array, ...]:
    """Fuses ``features`` (one array [B, ..., C_k] per modality).

    Args:
      features: the branches' feature maps, channels last; spatial shapes may differ.
      train: whether this is a training call (only those update ``fusion_stats``).
      cut: int32 scalar, the branch whose excitation is replaced by its running mean;
        -1 (default) for normal fusion.
      drop: bool[N] or None; True replaces that modality's squeeze vector by its
        training-split mean (the ``train_means`` collection, :func:`gml_jax.training_means`).

    Returns:
      The re-weighted feature maps, one per modality.
    """
    n = len(features)
    if n < 2:
      raise ValueError(f"MMTM fuses at least 2 modalities, got {n}.")
    check_switches(f"MMTM {self.path}", cut, drop, n)
    channels = [f.shape[-1] for f in features]
    squeezed = [CrossModalCut(sources=(k,), name=f"drop_{k}")(spatial_mean(f), train=train,
                                                               drop=drop)
                for k, f in enumerate(features)]
    hidden = int(2 * sum(channels) / self.ratio)
    z = nn.relu(nn.Dense(hidden, name="squeeze")(jnp.concatenate(squeezed, axis=-1)))
    outputs = []
    for k, (f, c) in enumerate(zip(features, channels)):
      excitation = nn.sigmoid(nn.Dense(c, name=f"excite_{k}")(z))
      used = CrossModalCut(branch=k, sources=(), name=f"cut_{k}")(excitation, train=train, cut=cut)
      outputs.append(f * used.reshape(used.shape[:1] + (1,) * (f.ndim - 2) + used.shape[1:]))
    return tuple(outputs)
