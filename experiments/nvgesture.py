r"""NVGesture, RGB and depth (spec §5): two I3D branches, MMTM after Mixed_4f, Mixed_5b and
Mixed_5c (the later Inception blocks, as in the MMTM paper's gesture experiments).

25 gesture classes; the official train/test lists; 10% of the training recordings held out
for validation; clips of the annotated gesture, 32 frames at 112x112 by default
(builder config ``frames64_224px`` for 64 frames at 224x224). Manual download only
(data_prep/nvgesture/README.md).

Variants (the part after ':'): ``vanilla``, ``random``, ``guided`` (default).

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

VARIANTS = ("vanilla", "random", "guided")


def get_config(variant: str = "guided") -> config_dict.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of nvgesture; expected one of {VARIANTS}.")
  c = config_dict.ConfigDict()
  c.experiment = "nvgesture"
  c.seed = 0

  c.data = config_dict.ConfigDict()
  c.data.name = "nvgesture"
  c.data.builder_config = "frames32_112px"  # or frames64_224px; frames8_32px for smoke tests
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.manual_dir = ""  # list files and Video_data/ (required)
  c.data.image_size = 0  # clips are sized by the builder config
  c.data.normalize = "none"
  c.data.hflip = False  # gestures have a direction: no flips

  c.model = config_dict.ConfigDict()
  c.model.name = "i3d"
  c.model.width = 64  # unused by i3d (fixed widths); kept for a uniform config
  c.model.ratio = 4.0
  # Converted weights per branch (.npz), "" to train from scratch.
  c.model.pretrained = ("", "")

  c.optimizer = config_dict.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4

  c.balance = config_dict.ConfigDict()
  c.balance.method = variant
  c.balance.alpha = 0.01
  c.balance.window = 5
  c.balance.warmup_epochs = 1
  c.balance.update_mode = "branch"

  c.schedule = config_dict.ConfigDict()
  c.schedule.name = "plateau"
  c.schedule.factor = 0.3
  c.schedule.patience = 10
  c.schedule.threshold = 1e-3
  c.schedule.min_lr = 1e-6
  c.early_stop_full_train_accuracy_epochs = 5

  c.batch_size = 8
  c.num_epochs = 60
  c.eval_batch_size = 16
  c.log_every_steps = 20
  c.checkpoint_every_steps = 0
  c.steps_per_call = 1
  return c
