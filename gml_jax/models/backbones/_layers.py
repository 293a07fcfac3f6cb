"""Layers shared by several backbones."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2, as a max of four strided slices (XLA:CPU lowers
  ``reduce_window`` and its gradient slowly; this form is about twice as fast there)."""
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  x = x[:, :h, :w]
  return jnp.maximum(
      jnp.maximum(x[:, 0::2, 0::2], x[:, 1::2, 0::2]),
      jnp.maximum(x[:, 0::2, 1::2], x[:, 1::2, 1::2]),
  )


class ConvBNReLU(nn.Module):
  """Convolution (no bias), BatchNorm, ReLU."""

  features: int
  kernel: int = 3
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(
        self.features, (self.kernel, self.kernel), strides=self.strides, padding="SAME",
        use_bias=False,
    )(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.relu(x)
