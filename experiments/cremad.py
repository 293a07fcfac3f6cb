r"""CREMA-D, audio + video (6 emotions): a ResNet-18 per modality (the spectrogram through a
one-channel ResNet-18, the frames through a 2-D ResNet-18 pooled over time), with the
recipe of the field's reference code (OGM-GE, Peng et al. CVPR 2022).

m_0 ``audio``: the log spectrogram of 3 s at 22,050 Hz, float32[257, 188, 1]; m_1
``visual``: 1 frame at 1 fps, 224x224 (builder config ``frames_1``; ``frames_2`` and
``frames_3`` keep more). The reference's train/test lists (6,698 / 744 clips), 10% of train
held out for validation. The clips need a manual download (data_prep/cremad/README.md: the
release's AudioWAV/ and VideoFlash/); the build decodes them once: measured on generated
clips of the real size (480x360, 30 fps, 2.5 s), about 3.3 min and 0.34 GB per 1,000 clips
for frames_1 on 2 busy CPU cores (data_prep/cremad/README.md).

Variants (the part after ':'): ``vanilla``, ``random``, ``guided`` (default), ``ogm_ge``,
``ogm_ge_joint`` and ``late_fusion_joint`` (the reference's own model: late fusion by
concatenation, one head, one cross-entropy), ``unimodal_0`` (audio), ``unimodal_1``
(visual), ``late_fusion``; MMTM sits after layer2, layer3 and layer4 as in the ModelNet40
model.

Launch (on a GPU or TPU machine holding the release):

  make data EXP=cremad ARGS="--config.data.manual_dir=/data/CREMA-D"
  make train EXP=cremad METHOD=ogm_ge_joint ARGS="--config.data.manual_dir=/data/CREMA-D"
  python -m gml_jax.runner.main --config experiments/cremad.py:guided --workdir runs/cremad \
      --config.data.manual_dir=/data/CREMA-D

Recipe of the reference code: SGD lr 1e-3, momentum 0.9, weight decay 1e-4, batch 64,
learning rate x0.1 every 70 epochs (StepLR), 100 epochs; ImageNet normalisation and random
horizontal flips on the frames (no random resized crop: data_prep/cremad/README.md lists
every difference).

Results here: none (the release cannot be downloaded on our machines; the pipeline is
tested on generated clips laid out like it).
"""

from ml_collections import config_dict

from experiments.common import DEFAULT_VARIANT, VARIANTS, base_config

__all__ = ["VARIANTS", "get_config"]


def get_config(variant: str = DEFAULT_VARIANT):
  c = base_config("cremad", variant, num_epochs=100)
  c.data.name = "cremad"
  c.data.builder_config = "frames_1"  # the reference's fps = 1 frame per clip
  # data.manual_dir: the release, AudioWAV/ and VideoFlash/ (required).
  c.data.normalize = "imagenet"  # the frames; the spectrogram is used as stored
  c.data.hflip = True  # the frames only
  c.model.name = "av_resnet18"
  c.model.av_resnet18 = config_dict.ConfigDict({"width": 64, "max_blocks": 2})
  c.optimizer.learning_rate = 1e-3
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "step"
  c.schedule.step_epochs = 70
  c.schedule.factor = 0.1
  c.batch_size = 64
  c.eval_batch_size = 64
  c.log_every_steps = 20
  return c
