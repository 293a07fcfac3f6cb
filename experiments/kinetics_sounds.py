r"""Kinetics-Sounds, audio + video (31 classes of the reference's lists, or the user's class
list): the CREMA-D model and recipe (a ResNet-18 per modality, the field's reference code:
OGM-GE, Peng et al. CVPR 2022) on 3 frames per clip.

m_0 ``audio``: the log spectrogram of the clip's first 3 s, float32[257, 188, 1]; m_1
``visual``: 3 frames at 1 fps (seconds 0, 3, 6), 224x224 (builder config ``frames_3``;
``frames_1`` keeps one). Splits: the reference's lists (14,799 / 2,597 clips) or the user's
train/test folders, 10% of train held out for validation. The clips are the user's
(data_prep/kinetics_sounds/README.md: train/<class>/<id>.mp4, or the reference's extracted
wav + frames).

Variants (the part after ':'): ``vanilla``, ``random``, ``guided`` (default), ``ogm_ge``,
``ogm_ge_joint`` and ``late_fusion_joint`` (the reference's model), ``unimodal_0`` (audio),
``unimodal_1`` (visual), ``late_fusion``.

Launch (on a GPU or TPU machine holding the clips):

  make data EXP=kinetics_sounds ARGS="--config.data.manual_dir=/data/kinetics_sounds"
  make train EXP=kinetics_sounds METHOD=ogm_ge_joint \
      ARGS="--config.data.manual_dir=/data/kinetics_sounds"

Recipe of the reference code: SGD lr 1e-3, momentum 0.9, weight decay 1e-4, batch 64,
learning rate x0.1 every 70 epochs, 100 epochs, 3 frames per clip.

Results here: none (no clips on our machines; tested on generated clips).
"""

from experiments import cremad
from experiments.common import DEFAULT_VARIANT, VARIANTS

__all__ = ["VARIANTS", "get_config"]


def get_config(variant: str = DEFAULT_VARIANT):
  c = cremad.get_config(variant)
  c.experiment = "kinetics_sounds"
  c.data.name = "kinetics_sounds"
  c.data.builder_config = "frames_3"  # 3 frames per clip, as the reference
  # data.manual_dir: the clips, train/<class>/<id>.mp4 + test/..., or audio/ + frames/.
  return c
