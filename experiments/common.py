"""The fields every experiment config shares, and their defaults.

Each experiment's ``get_config`` starts from :func:`base_config` and sets what differs; its
own file shows those values.
"""

from ml_collections import config_dict

# The variants (the part after ':' of --config) are the balancing methods' own
# (gml_jax/runner/methods/): each method's name, and the variants it registers (its
# controls; vanilla's baselines: each modality alone, late fusion, OGM-GE's authors' late
# fusion through one joint head).
from gml_jax.runner import methods
from gml_jax.runner.names import DEFAULT_VARIANT, VARIANTS

__all__ = ["DEFAULT_VARIANT", "VARIANTS", "base_config"]


def base_config(experiment: str, variant: str, num_epochs: int = 10) -> config_dict.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of {experiment}; expected one of {VARIANTS}.")
  method = methods.variant_method(variant)
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
  # The dataset's modalities the model reads, one branch each: (0, 1), or (0,) / (1,) alone.
  c.data.modalities = (0, 1)

  c.model = config_dict.ConfigDict()
  c.model.name = ""  # small_cnn, resnet18 or i3d
  # A backbone's options sit under its name (model.<name>.<option>, e.g. model.small_cnn.width),
  # set by the experiment that uses it; an option not set there keeps the backbone's default.
  c.model.ratio = 4.0  # MMTM squeeze ratio
  # "mmtm" (intermediate fusion, the paper's model) or "none": no fusion layers, ŷ is the
  # mean of the branches' logits (late fusion; with one modality, a uni-modal model).
  c.model.fusion = "mmtm"
  # "branch": each branch has its own linear head and loss (the paper's model); "joint": one
  # head over every branch's pooled features trained with the fused output's cross-entropy
  # alone, branch k's logits being its share of that head (OGM-GE's authors' model).
  c.model.head = "branch"
  c.model.pretrained = ("", "")  # converted weights (.npz) per branch; "": from scratch
  # Compute dtype of the train step: float32, or bfloat16 (mixed precision: activations,
  # matmuls and convolutions in bfloat16; parameters, optimizer and balancing state float32).
  c.model.dtype = "float32"

  c.optimizer = config_dict.ConfigDict()
  c.optimizer.name = "sgd"  # sgd or adam
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9  # sgd only; 0 for plain SGD
  c.optimizer.weight_decay = 0.0

  # The balancing method (gml_jax/runner/methods/) and, under each method's name, its
  # options (balance.guided.alpha, balance.ogm_ge.alpha, ...): every method's section is
  # here, so that a study's overrides and grids reach every run; a run reads its own.
  c.balance = config_dict.ConfigDict()
  c.balance.method = method.name
  for name in methods.names():
    c.balance[name] = methods.get(name).defaults()

  # Learning rate: "constant", or "plateau" (x factor after more than `patience` epochs
  # whose training loss improved by less than `threshold`, relative; not below min_lr), or
  # "step" (x factor every `step_epochs` epochs: the audio-visual references' recipe).
  c.schedule = config_dict.ConfigDict()
  c.schedule.name = "constant"
  c.schedule.factor = 0.3
  c.schedule.patience = 10
  c.schedule.threshold = 1e-3
  c.schedule.min_lr = 1e-6
  c.schedule.step_epochs = 70  # "step": x factor every step_epochs epochs (PyTorch's StepLR)
  # Stop once the training accuracy has been 100% in this many epochs (0: never).
  c.early_stop_full_train_accuracy_epochs = 0

  c.batch_size = 64  # global, over all devices and processes
  c.num_epochs = num_epochs
  c.eval_batch_size = 256
  c.log_every_steps = 10  # progress bar and host-side metric fetches
  c.checkpoint_every_steps = 0  # 0: at the end of every epoch only
  # The utilization rates and d_util on the validation split at every epoch end, beside the
  # epoch's d_speed (metrics/epochs.jsonl): an extra pass over the training examples below
  # and N over the validation split. The means that stand in for a dropped modality come
  # from the first `utilization_train_examples` training examples (0: all of them).
  c.utilization_every_epoch = False
  c.utilization_train_examples = 0
  # Train steps per compiled call (an unrolled scan; results identical to 1). Chosen per
  # experiment by measurement (benchmarks/RESULTS.md): 1 here and for Colored MNIST, whose
  # 10-epoch run loses more to the longer compile (43 s against 4 s for K = 8) than it gains
  # (1.2x); ModelNet40 sets 4.
  c.steps_per_call = 1

  # Logging beside metrics/ and tensorboard/: Weights & Biases where a project is named
  # (pip install -e '.[wandb]'); mode "offline" keeps the run in the workdir's wandb/.
  c.logging = config_dict.ConfigDict()
  c.logging.wandb = config_dict.ConfigDict({"project": "", "entity": "", "mode": "online"})

  if variant != method.name:
    method.variants[variant](c)
  return c
