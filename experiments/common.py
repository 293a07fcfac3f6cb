"""The fields every experiment config shares, and their defaults.

Each experiment's ``get_config`` starts from :func:`base_config` and sets what differs; its
own file shows those values.
"""

from ml_collections import config_dict

from gml_jax.balancing import METHODS

VARIANTS = METHODS  # one variant per balancing method


def base_config(experiment: str, variant: str) -> config_dict.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of {experiment}; expected one of {VARIANTS}.")
  c = config_dict.ConfigDict()
  c.experiment = experiment
  c.seed = 0  # initialisation, data order, flips, and the random method's draws

  c.data = config_dict.ConfigDict()
  c.data.name = ""  # a builder package data_prep/<name>/
  c.data.builder_config = ""
  c.data.data_dir = "~/tensorflow_datasets"  # where the built dataset is kept
  c.data.manual_dir = ""  # the dataset's manual files, where it needs them
  c.data.image_size = 0  # resize images to this square size; 0: as stored
  c.data.normalize = "none"  # "none" (pixels / 255) or "imagenet"
  c.data.hflip = False  # random horizontal flips in training

  c.model = config_dict.ConfigDict()
  c.model.name = ""  # small_cnn, resnet18 or i3d
  c.model.width = 32  # small_cnn only: channels of the first stage (then 2x)
  c.model.ratio = 4.0  # MMTM squeeze ratio
  c.model.pretrained = ("", "")  # converted weights (.npz) per branch; "": from scratch
  # Compute dtype of the train step: float32, or bfloat16 (mixed precision: activations,
  # matmuls and convolutions in bfloat16; parameters, optimizer and balancing state float32).
  c.model.dtype = "float32"

  c.optimizer = config_dict.ConfigDict()
  c.optimizer.name = "sgd"  # sgd or adam
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9  # sgd only; 0 for plain SGD
  c.optimizer.weight_decay = 0.0

  c.balance = config_dict.ConfigDict()
  c.balance.method = variant  # vanilla, random or guided
  c.balance.alpha = 0.01  # threshold on |d_speed| (log10 scale), authors' value
  c.balance.window = 5  # Q: re-balancing steps per decision, authors' value
  c.balance.warmup_epochs = 1  # the authors balance from the second epoch on
  c.balance.update_mode = "branch"  # branch (paper) or all (authors' code)

  # Learning rate: "constant", or "plateau" (x factor after more than `patience` epochs
  # whose training loss improved by less than `threshold`, relative; not below min_lr).
  c.schedule = config_dict.ConfigDict()
  c.schedule.name = "constant"
  c.schedule.factor = 0.3
  c.schedule.patience = 10
  c.schedule.threshold = 1e-3
  c.schedule.min_lr = 1e-6
  # Stop once the training accuracy has been 100% in this many epochs (0: never).
  c.early_stop_full_train_accuracy_epochs = 0

  c.batch_size = 64  # global, over all devices and processes
  c.num_epochs = 10
  c.eval_batch_size = 256
  c.log_every_steps = 10  # progress bar and host-side metric fetches
  c.checkpoint_every_steps = 0  # 0: at the end of every epoch only
  # Train steps per compiled call (an unrolled scan; results identical to 1). 8 runs the
  # CNN pair about 1.4x faster on a 2-core CPU but compiles for ~15 s more: worth it for
  # long runs (benchmarks/RESULTS.md).
  c.steps_per_call = 1
  return c
