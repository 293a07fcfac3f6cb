"""The fields every experiment config shares, and their defaults.

Each experiment's ``get_config`` starts from :func:`base_config` and sets what differs; its
own file shows those values.
"""

from ml_collections import config_dict

# The variants (the part after ':' of --config), defined once for the runner and the
# configs in gml_jax/runner/names.py: one per balancing method of the paper, OGM-GE on the
# paper's model (per-branch heads and losses) and as its authors run it (`ogm_ge_joint`,
# docs/methods/ogm_ge.md), and the baselines: each modality alone, late fusion (no MMTM), and the
# OGM-GE authors' late fusion without modulation (`late_fusion_joint`: one head over both
# branches' features, one cross-entropy on the fused output).
from gml_jax.runner.names import BASELINES, DEFAULT_VARIANT, JOINT_HEAD_VARIANTS, VARIANTS

__all__ = ["DEFAULT_VARIANT", "VARIANTS", "base_config"]


def base_config(experiment: str, variant: str, num_epochs: int = 10) -> config_dict.ConfigDict:
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

  c.balance = config_dict.ConfigDict()
  # vanilla, random, guided (the paper's), or ogm_ge (Peng et al., CVPR 2022:
  # docs/methods/ogm_ge.md)
  c.balance.method = {"ogm_ge_joint": "ogm_ge"}.get(variant, variant)
  if variant in BASELINES:
    c.balance.method = "vanilla"
  c.balance.alpha = 0.01  # threshold on |d_speed| (log10 scale), authors' value
  c.balance.window = 5  # Q: re-balancing steps per decision, authors' value
  c.balance.target = 0  # fixed: the modality its windows re-balance
  c.balance.random_shares = ()  # random: () uniform draws, or a probability per modality
  c.balance.warmup_epochs = 1  # the authors balance from the second epoch on
  c.balance.update_mode = "branch"  # branch (paper) or all (authors' code)
  c.balance.ogm_alpha = 0.8  # ogm_ge: α of the coefficient 1 - tanh(α ρ)
  c.balance.ogm_noise = True  # ogm_ge: add the generalisation-enhancement noise (GE)
  c.balance.ogm_continuous = False  # ogm_ge: 1 - tanh(α (ρ - 1)) instead of the paper's α ρ
  # ogm_ge: what is modulated: "branch" (every parameter of a branch, its head included) or
  # "encoder_kernels" (a branch encoder's kernels of rank >= 2: the authors' scope).
  c.balance.ogm_scope = "branch"
  # ogm_ge: the epochs (first, last) that modulate, both included (the authors' default is
  # (0, 50) of 100 epochs); (): every epoch. Set it again when changing num_epochs.
  c.balance.ogm_epochs = ()

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

  if variant.startswith("fixed_"):  # guided's schedule, its target pinned
    c.balance.method, c.balance.target = "fixed", int(variant[len("fixed_"):])
  if variant == "random_matched":  # guided's shares with back-to-back windows
    c.balance.method = "random"
    c.balance.random_shares = (c.balance.window / (c.balance.window + 1), 0.0)
  if variant.startswith("unimodal_"):
    c.data.modalities = (int(variant[len("unimodal_"):]),)
  if variant in BASELINES:
    c.model.fusion = "none"
  if variant in JOINT_HEAD_VARIANTS:  # late fusion through one head
    c.model.fusion, c.model.head = "none", "joint"
  if variant == "ogm_ge_joint":  # the authors' scope and window: their first half of epochs
    c.balance.ogm_scope = "encoder_kernels"
    c.balance.ogm_epochs = (0, num_epochs // 2)
  return c
