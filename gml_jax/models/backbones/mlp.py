"""An MLP backbone for feature-vector modalities (e.g. the six views of mfeat): three
stages of Dense, BatchNorm, ReLU, fused after the second and the third.

MMTM works on it as on a CNN: a stage's output [B, C] is its own squeeze vector (there are
no spatial axes to average), and the excitation scales its C features. Each branch reads
its own input size (Dense infers it), so views of 6 and of 240 features share a backbone.
"""

from __future__ import annotations

import flax.linen as nn
import jax

FUSION_AFTER = (1, 2)


class DenseBNReLU(nn.Module):
  """Dense (no bias), BatchNorm, ReLU over the last axis."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Dense(self.features, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.relu(x)


def stages(width: int = 128) -> list[nn.Module]:
  """Three ``DenseBNReLU`` stages of ``width``, ``width`` and ``width // 2`` units."""
  if width < 2:
    raise ValueError(f"mlp: width must be at least 2 units, got {width}.")
  return [DenseBNReLU(width), DenseBNReLU(width), DenseBNReLU(width // 2)]
