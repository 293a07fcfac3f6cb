"""The ModelNet40 backbone (spec §5): ResNet-18 in five stages (stem, layer1 ... layer4),
fused after layer2, layer3 and layer4."""

from __future__ import annotations

import flax.linen as nn
import jax

from gml_jax.models.backbones._layers import ConvBNReLU

FUSION_AFTER = (2, 3, 4)


class ResNetStem(nn.Module):
  """conv7x7-64 stride 2, BN, ReLU, 3x3 max pooling stride 2 (64: ``width``)."""

  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = ConvBNReLU(self.width, 7, 2)(x, train)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 convolutions with a residual connection."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = ConvBNReLU(self.features, 3, self.strides)(x, train)
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.relu(x + y)


class ResNetLayer(nn.Module):
  """A ResNet layer: ``blocks`` basic blocks, the first with stride ``strides``."""

  features: int
  blocks: int = 2
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.blocks):
      x = BasicBlock(self.features, self.strides if i == 0 else 1)(x, train)
    return x


def stages(width: int = 64, max_blocks: int = 2) -> list[nn.Module]:
  """ResNet-18 (He et al. 2016) as five stages: stem, layer1 ... layer4.

  ``width``: the channels of the stem and layer1 (64 is ResNet-18); layer2 ... layer4 have
  2, 4 and 8 times as many (a narrower network of the same shape, e.g. for tests).
  ``max_blocks``: the most basic blocks a layer keeps; 2 is ResNet-18 (its layers have 2),
  1 a shallower network (ResNet-10), e.g. for tests.
  """
  if width < 1:
    raise ValueError(f"resnet18: width must be a positive channel count, got {width}.")
  if max_blocks < 1:
    raise ValueError(f"resnet18: max_blocks must be at least 1, got {max_blocks}.")
  blocks = min(max_blocks, 2)
  return [
      ResNetStem(width),
      ResNetLayer(width, blocks),
      ResNetLayer(2 * width, blocks, strides=2),
      ResNetLayer(4 * width, blocks, strides=2),
      ResNetLayer(8 * width, blocks, strides=2),
  ]
