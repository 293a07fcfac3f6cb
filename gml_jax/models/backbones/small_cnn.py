"""The Colored MNIST backbone (spec §5): a small CNN in three stages, fused after the
second and the third."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from gml_jax.models.backbones._layers import ConvBNReLU, max_pool_2x2

FUSION_AFTER = (1, 2)


class CNNStage(nn.Module):
  """A stage of the small CNN: ConvBNReLU layers given as (features, kernel, strides),
  with optional 2x2 max pooling after the first layer."""

  layers: Sequence[tuple[int, int, int]]
  pool_after_first: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, (features, kernel, strides) in enumerate(self.layers):
      x = ConvBNReLU(features, kernel, strides)(x, train)
      if i == 0 and self.pool_after_first:
        x = max_pool_2x2(x)
    return x


def stages(width: int = 32) -> list[nn.Module]:
  """The Colored MNIST branch of the spec (§5), in three stages:
  [conv5x5-w, BN, ReLU, maxpool2, conv3x3-w, BN, ReLU], [conv3x3-2w stride 2, BN, ReLU],
  [conv3x3-2w, BN, ReLU]."""
  return [
      CNNStage(((width, 5, 1), (width, 3, 1)), pool_after_first=True),
      CNNStage(((2 * width, 3, 2),)),
      CNNStage(((2 * width, 3, 1),)),
  ]
