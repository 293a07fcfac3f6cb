"""The audio-visual backbone of the field's reference code (OGM-GE, Peng et al. CVPR 2022;
reused by later balancing methods): a ResNet-18 per modality.

* Audio: a spectrogram [B, F, T, 1] through a 2-D ResNet-18 whose first convolution reads
  one channel (the input's channel count sets it).
* Visual: frames [B, T, H, W, 3] through a 2-D ResNet-18, every frame on its own (time
  folded into the batch, so BatchNorm sees B x T images), the feature maps kept per frame
  [B, T, H', W', C]: global pooling then averages over time and space together, as the
  reference's adaptive 3-D average pooling does.

The stages are those of :mod:`resnet18` (stem, layer1 ... layer4), so MMTM can sit after
layer2, layer3 and layer4 as in the ModelNet40 model; with ``fusion='none'`` and
``head='joint'`` it is the reference's model (late fusion by concatenation, one head).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from gml_jax.models.backbones import resnet18

FUSION_AFTER = resnet18.FUSION_AFTER


class TimeFolded(nn.Module):
  """A 2-D stage applied to every frame of a [B, T, H, W, C] clip (time folded into the
  batch); a [B, H, W, C] input passes through it as it is."""

  stage: nn.Module

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if x.ndim != 5:
      return self.stage(x, train)
    b, t = x.shape[:2]
    y = self.stage(x.reshape((b * t,) + x.shape[2:]), train)
    return y.reshape((b, t) + y.shape[1:])


def stages(width: int = 64, max_blocks: int = 2) -> list[nn.Module]:
  """ResNet-18's five stages (:func:`resnet18.stages`, same options), each applied frame by
  frame to a clip."""
  return [TimeFolded(s) for s in resnet18.stages(width, max_blocks)]
