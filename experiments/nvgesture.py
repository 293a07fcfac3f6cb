r"""NVGesture, RGB and depth (spec §5): two I3D branches, MMTM after Mixed_4f, Mixed_5b and
Mixed_5c (the later Inception blocks, as in the MMTM paper's gesture experiments).

25 gesture classes; the official train/test lists; 10% of the training recordings held out
for validation; clips of the annotated gesture, 32 frames at 112x112 by default
(builder config ``frames64_224px`` for 64 frames at 224x224). Manual download only
(data_prep/nvgesture/README.md).

Variants (the part after ':'): ``vanilla``, ``random``, ``guided`` (default), ``ogm_ge``,
``ogm_ge_joint``, ``unimodal_0``, ``unimodal_1``, ``late_fusion``, ``late_fusion_joint``
(docs/tutorials/runner.md, "Variants").

Launch (on a GPU or TPU machine holding the dataset):

  make train EXP=nvgesture METHOD=guided ARGS="--config.data.manual_dir=/data/nvgesture"
  # Kinetics-pretrained I3D converted to .npz (see gml_jax.models.load_branch_weights):
  make train EXP=nvgesture METHOD=guided ARGS="--config.data.manual_dir=/data/nvgesture \
      --config.model.pretrained='(\"/w/i3d_rgb.npz\", \"/w/i3d_rgb.npz\")'"

Defaults: SGD lr 0.01 momentum 0.9, weight decay 1e-4 (I3D practice; the paper does not give
a recipe for this experiment), batch 8, 60 epochs, training from scratch. Results here:
none yet (no dataset on our machines; the pipeline is tested on generated videos).
"""

from ml_collections import config_dict

from experiments.common import DEFAULT_VARIANT, VARIANTS, base_config

__all__ = ["VARIANTS", "get_config"]  # VARIANTS: the variants of get_config, for users


def get_config(variant: str = DEFAULT_VARIANT):
  c = base_config("nvgesture", variant, num_epochs=60)
  c.data.name = "nvgesture"
  c.data.builder_config = "frames32_112px"  # or frames64_224px; frames8_32px: smoke tests
  # data.manual_dir: list files and Video_data/ (required). Clips are sized by the builder
  # config; no flips (gestures have a direction).
  c.model.name = "i3d"
  # channels of the first stage, 64 is I3D; Inception modules a stage keeps at most, 4 is I3D
  # (smaller: a narrower or shallower net for smoke tests)
  c.model.i3d = config_dict.ConfigDict({"width": 64, "max_blocks": 4})
  # model.pretrained: converted weights per branch (.npz), "" to train from scratch.
  c.optimizer.weight_decay = 1e-4  # SGD lr 0.01 momentum 0.9 (common.py)
  c.schedule.name = "plateau"
  c.early_stop_full_train_accuracy_epochs = 5
  c.batch_size = 8
  c.eval_batch_size = 16
  c.log_every_steps = 20
  # steps_per_call stays 1: a call's dispatch (~0.3 ms, measured on CPU) is small beside an
  # I3D-pair step (20 s on the 2-core CPU); to revisit with `make bench-device` on a GPU.
  return c
