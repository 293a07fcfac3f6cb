"""The NVGesture backbone: I3D (Inception-v1 inflated to 3-D, Carreira & Zisserman 2017) in
six stages, fused after Mixed_4f, Mixed_5b and Mixed_5c."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

FUSION_AFTER = (3, 4, 5)


class Unit3D(nn.Module):
  """3-D convolution (no bias), BatchNorm, ReLU: the unit of I3D."""

  features: int
  kernel: tuple[int, int, int] = (1, 1, 1)
  strides: tuple[int, int, int] = (1, 1, 1)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.features, self.kernel, strides=self.strides, padding="SAME",
                use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3)(x)
    return nn.relu(x)


class InceptionBlock(nn.Module):
  """I3D's Inception module; ``features`` = (1x1, 3x3 reduce, 3x3, 3x3 reduce, 3x3, pool
  projection), as in Carreira & Zisserman (2017)."""

  features: tuple[int, int, int, int, int, int]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    a, b_reduce, b, c_reduce, c, pool = self.features
    branch_a = Unit3D(a)(x, train)
    branch_b = Unit3D(b, (3, 3, 3))(Unit3D(b_reduce)(x, train), train)
    branch_c = Unit3D(c, (3, 3, 3))(Unit3D(c_reduce)(x, train), train)
    pooled = nn.max_pool(x, (3, 3, 3), strides=(1, 1, 1), padding="SAME")
    return jnp.concatenate([branch_a, branch_b, branch_c, Unit3D(pool)(pooled, train)], -1)


class I3DStage(nn.Module):
  """Optional 3-D max pooling, then Inception modules."""

  blocks: Sequence[tuple[int, ...]]
  pool: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.pool is not None:
      x = nn.max_pool(x, self.pool[0], strides=self.pool[1], padding="SAME")
    for features in self.blocks:
      x = InceptionBlock(tuple(features))(x, train)
    return x


class I3DStem(nn.Module):
  """conv 7x7x7-64 /2, pool 1x3x3 /1x2x2, conv 1x1x1-64, conv 3x3x3-192, pool 1x3x3 (the
  channel counts for ``width`` 64)."""

  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Unit3D(self.width, (7, 7, 7), (2, 2, 2))(x, train)
    x = nn.max_pool(x, (1, 3, 3), strides=(1, 2, 2), padding="SAME")
    x = Unit3D(self.width)(x, train)
    x = Unit3D(3 * self.width, (3, 3, 3))(x, train)
    return nn.max_pool(x, (1, 3, 3), strides=(1, 2, 2), padding="SAME")


I3D_BLOCKS = {  # Inception modules of I3D, by name
    "3b": (64, 96, 128, 16, 32, 32), "3c": (128, 128, 192, 32, 96, 64),
    "4b": (192, 96, 208, 16, 48, 64), "4c": (160, 112, 224, 24, 64, 64),
    "4d": (128, 128, 256, 24, 64, 64), "4e": (112, 144, 288, 32, 64, 64),
    "4f": (256, 160, 320, 32, 128, 128), "5b": (256, 160, 320, 32, 128, 128),
    "5c": (384, 192, 384, 48, 128, 128),
}


def stages(width: int = 64, max_blocks: int = 4) -> list[nn.Module]:
  """I3D (Inception-v1 inflated to 3-D) as six stages; the last three end in Mixed_4f,
  Mixed_5b and Mixed_5c, where the gesture model fuses.

  ``width``: the stem's first channel count; 64 is I3D, and every other channel count
  scales with it (a narrower network of the same shape, e.g. for tests).
  ``max_blocks``: the most Inception modules a stage keeps, its first ones; 4 is I3D (its
  stages have 2, 4, 1, 1 and 1), 1 a shallower network (5 modules instead of 9) that
  compiles in about half the time, e.g. for tests.
  """
  if width < 1:
    raise ValueError(f"i3d: width must be a positive channel count, got {width}.")
  if max_blocks < 1:
    raise ValueError(f"i3d: max_blocks must be at least 1, got {max_blocks}.")
  b = {name: tuple(max(1, round(c * width / 64)) for c in block)
       for name, block in I3D_BLOCKS.items()}
  blocks = lambda *names: tuple(b[name] for name in names[:max_blocks])
  return [
      I3DStem(width),
      I3DStage(blocks("3b", "3c")),
      I3DStage(blocks("4b", "4c", "4d", "4e"), pool=((3, 3, 3), (2, 2, 2))),
      I3DStage(blocks("4f")),
      I3DStage(blocks("5b"), pool=((2, 2, 2), (2, 2, 2))),
      I3DStage(blocks("5c")),
  ]
