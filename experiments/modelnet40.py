r"""ModelNet40, front and rear views (spec §5): two ResNet-18 branches, MMTM after layer2,
layer3 and layer4, trained with the authors' recipe.

m_0 and m_1 are views 0 and 6 of the 12 MVCNN shaded renders of each object (opposite
sides); 40 classes; the official test split; 20% of the training objects held out for
validation. The renders need a manual download (data_prep/modelnet40_views/README.md).

Variants (the part after ':'): ``vanilla``, ``random``, ``guided`` (default), ``ogm_ge``,
``ogm_ge_joint``, ``unimodal_0``, ``unimodal_1``, ``late_fusion``, ``late_fusion_joint``
(docs/tutorials/runner.md, "Variants").

Launch (on a GPU or TPU machine holding the renders):

  make train EXP=modelnet40 METHOD=guided ARGS="--config.data.manual_dir=/data/modelnet40"
  python -m gml_jax.runner.main --config experiments/modelnet40.py:guided \
      --workdir runs/mn40_guided --config.data.manual_dir=/data/modelnet40

Recipe of the authors' code: SGD lr 0.1, no momentum, no weight decay, batch 8; learning
rate x0.3 when the training loss plateaus (patience 10 epochs, relative threshold 1e-3,
floor 1e-6); up to 300 epochs; stop once the training accuracy has been 100% in 5 epochs;
keep the best validation checkpoint; random horizontal flips, ImageNet normalization.

Results here: none yet (the renders cannot be downloaded on our machines; the pipeline is
tested on dummy data laid out like the real tree).
"""

from ml_collections import config_dict

from experiments.common import DEFAULT_VARIANT, VARIANTS, base_config

__all__ = ["VARIANTS", "get_config"]  # VARIANTS: the variants of get_config, for users


def get_config(variant: str = DEFAULT_VARIANT):
  c = base_config("modelnet40", variant, num_epochs=300)
  c.data.name = "modelnet40_views"
  # views_0_6_224px: views 0 and 6 decoded and resized once, at build time (default; ~7x
  # the disk of the PNGs); views_0_6, views_0_3, views_0_1: the PNGs, decoded every epoch.
  c.data.builder_config = "views_0_6_224px"
  # data.manual_dir: the renders, modelnet40_images_new_12x/ or its archive (required).
  c.data.image_size = 224
  c.data.normalize = "imagenet"
  c.data.hflip = True
  c.model.name = "resnet18"
  # channels of the first stage, 64 is ResNet-18; basic blocks a layer keeps, 2 is ResNet-18
  # (smaller: a narrower or shallower net for smoke tests)
  c.model.resnet18 = config_dict.ConfigDict({"width": 64, "max_blocks": 2})
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.0
  c.schedule.name = "plateau"  # x0.3, patience 10, threshold 1e-3, floor 1e-6 (common.py)
  c.early_stop_full_train_accuracy_epochs = 5
  c.batch_size = 8
  c.eval_batch_size = 32
  c.log_every_steps = 50
  # 4 steps per compiled call: 1.10-1.15x faster steps on the ResNet-18 pair (2-core CPU,
  # benchmarks/RESULTS.md) for 13 s more compilation, once in a run of ~350k steps.
  c.steps_per_call = 4
  # α 0.01, Q 5, one warm-up epoch, update "branch": as in experiments/common.py.
  return c
