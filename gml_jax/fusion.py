"""MMTM fusion (Joze et al., CVPR 2020) for N >= 2 modalities, with the switches that
balanced multi-modal learning needs.

One module serves three behaviours, chosen by traced arguments so that one compiled
function handles all of them:

* normal fusion;
* ``cut=k``: the cross-modal flow into branch k is cut: its excitation is replaced by the
  running mean of its excitations over earlier training calls (spec §3);
* ``drop[j]=True``: modality j's squeeze vector is replaced by a constant, its mean over
  the training split (spec §4), found in the ``squeeze_mean`` collection.

Variables:

* ``params``: ``squeeze`` (shared W_sq, b_sq) and ``excite_<k>`` (W_k, b_k, the head into
  branch k);
* ``fusion_stats``: ``excitation_mean_<k>`` and ``excitation_count_<k>``, the cumulative
  mean of the batch-mean excitation e_k; updated only by training calls (``train=True``
  with the collection mutable) in which e_k was computed normally. Unlike the authors'
  code, each modality has its own mean and evaluation calls never move it.
* ``squeeze_mean`` (optional, given by the caller): ``squeeze_<k>``, float[C_k].

Squeeze vectors are sown into ``intermediates`` as ``squeeze_<k>`` (float[B, C_k]).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

FUSION_STATS = "fusion_stats"
SQUEEZE_MEAN = "squeeze_mean"


def spatial_mean(x: jax.Array) -> jax.Array:
  """Mean over every axis but the first (batch) and the last (channels)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def _keep_latest(_, value):
  return value


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
      drop: bool[N] or None; True replaces that modality's squeeze vector by
        ``squeeze_mean``.

    Returns:
      The re-weighted feature maps, one per modality.
    """
    n = len(features)
    if n < 2:
      raise ValueError(f"MMTM fuses at least 2 modalities, got {n}.")
    channels = [f.shape[-1] for f in features]
    squeezed = [spatial_mean(f) for f in features]
    for k, s in enumerate(squeezed):
      self.sow("intermediates", f"squeeze_{k}", s, init_fn=lambda: None, reduce_fn=_keep_latest)
    if drop is not None:
      for k in range(n):
        if not self.has_variable(SQUEEZE_MEAN, f"squeeze_{k}"):
          raise ValueError(
              f"MMTM {self.path}: `drop` needs the '{SQUEEZE_MEAN}' collection "
              f"(squeeze_{k}: float[{channels[k]}]); compute it with "
              "gml_jax.utilization.squeeze_means."
          )
      squeezed = [
          jnp.where(drop[k], self.get_variable(SQUEEZE_MEAN, f"squeeze_{k}")[None], s)
          for k, s in enumerate(squeezed)
      ]

    hidden = int(2 * sum(channels) / self.ratio)
    z = nn.relu(nn.Dense(hidden, name="squeeze")(jnp.concatenate(squeezed, axis=-1)))
    update_stats = train and self.is_mutable_collection(FUSION_STATS) and not self.is_initializing()

    outputs = []
    for k, (f, c) in enumerate(zip(features, channels)):
      excitation = nn.sigmoid(nn.Dense(c, name=f"excite_{k}")(z))
      mean = self.variable(FUSION_STATS, f"excitation_mean_{k}", jnp.zeros, (c,), jnp.float32)
      count = self.variable(FUSION_STATS, f"excitation_count_{k}", jnp.zeros, (), jnp.float32)
      is_cut = jnp.asarray(cut) == k
      # The mean of *earlier* calls replaces e_k, before this call could update it.
      used = jnp.where(is_cut, mean.value.astype(excitation.dtype)[None], excitation)
      if update_stats:
        new_count = count.value + 1.0
        new_mean = mean.value + (jnp.mean(excitation, axis=0) - mean.value) / new_count
        mean.value = jnp.where(is_cut, mean.value, new_mean)
        count.value = jnp.where(is_cut, count.value, new_count)
      outputs.append(f * used.reshape(used.shape[:1] + (1,) * (f.ndim - 2) + used.shape[1:]))
    return tuple(outputs)
