"""MMTM against a NumPy forward pass; cutting, running means, squeeze substitution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gml_jax
from gml_jax.fusion import FUSION_STATS, MMTM, TRAIN_MEANS

sigmoid = lambda x: 1 / (1 + np.exp(-x))


def _inputs(rng, batch=4):
  return [
      jnp.asarray(rng.normal(size=(batch, 4, 4, 3)), jnp.float32),
      jnp.asarray(rng.normal(size=(batch, 2, 2, 5)), jnp.float32),
  ]


def _numpy_mmtm(params, xs, squeezed=None):
  """MMTM by hand (spec §1); ``squeezed`` overrides the squeeze vectors."""
  xs = [np.asarray(x, np.float64) for x in xs]
  s = squeezed or [x.mean(axis=(1, 2)) for x in xs]
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  z = np.maximum(np.concatenate(s, -1) @ p["squeeze"]["kernel"] + p["squeeze"]["bias"], 0)
  excitations = [sigmoid(z @ p[f"excite_{k}"]["kernel"] + p[f"excite_{k}"]["bias"])
                 for k in range(2)]
  return [x * e[:, None, None, :] for x, e in zip(xs, excitations)], excitations


def test_forward_matches_numpy_and_shapes():
  rng = np.random.default_rng(0)
  xs = _inputs(rng)
  module = MMTM()
  variables = module.init(jax.random.key(1), xs, train=False)
  # int(2 * (3 + 5) / 4) = 4 hidden units in the shared squeeze layer.
  assert variables["params"]["squeeze"]["kernel"].shape == (8, 4)
  outputs = module.apply(variables, xs, train=False)
  expected, _ = _numpy_mmtm(variables["params"], xs)
  for out, exp in zip(outputs, expected):
    np.testing.assert_allclose(out, exp, rtol=1e-5, atol=1e-6)


def test_running_means_follow_training_calls_only():
  rng = np.random.default_rng(2)
  module = MMTM()
  variables = module.init(jax.random.key(0), _inputs(rng), train=False)
  params = variables["params"]
  stats = variables[FUSION_STATS]
  seen = [[], []]
  for cut in (-1, -1, 0, -1, 1, -1):
    xs = _inputs(rng)
    _, excitations = _numpy_mmtm(params, xs)
    _, updated = module.apply(
        {"params": params, FUSION_STATS: stats}, xs, train=True, cut=jnp.int32(cut),
        mutable=[FUSION_STATS],
    )
    stats = updated[FUSION_STATS]
    for k in range(2):
      if cut != k:
        seen[k].append(excitations[k].mean(axis=0))
    # An evaluation call never moves the means, even with the collection mutable.
    _, after_eval = module.apply(
        {"params": params, FUSION_STATS: stats}, xs, train=False, mutable=[FUSION_STATS]
    )
    jax.tree.map(np.testing.assert_array_equal, after_eval[FUSION_STATS], stats)
  for k in range(2):
    np.testing.assert_allclose(stats[f"cut_{k}"]["running_mean"], np.mean(seen[k], axis=0),
                               rtol=1e-5)
    assert float(stats[f"cut_{k}"]["running_count"]) == len(seen[k]) == 5


def test_cut_replaces_excitation_by_running_mean():
  rng = np.random.default_rng(3)
  xs = _inputs(rng)
  module = MMTM()
  variables = module.init(jax.random.key(0), xs, train=False)
  means = {"cut_0": {"running_mean": jnp.linspace(0.1, 0.9, 3), "running_count": jnp.float32(4)},
           "cut_1": {"running_mean": jnp.linspace(0.2, 0.6, 5), "running_count": jnp.float32(4)}}
  variables = {"params": variables["params"], FUSION_STATS: means}
  out = module.apply(variables, xs, train=False, cut=jnp.int32(1))
  expected, _ = _numpy_mmtm(variables["params"], xs)
  np.testing.assert_allclose(out[0], expected[0], rtol=1e-5, atol=1e-6)  # branch 0: normal
  np.testing.assert_allclose(out[1], np.asarray(xs[1]) * np.asarray(means["cut_1"]["running_mean"]),
                             rtol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_cut_makes_branch_independent_of_other_modality(train):
  rng = np.random.default_rng(4)
  model = gml_jax.small_cnn_fusion(num_classes=5, width=4)
  xs = [jnp.asarray(rng.normal(size=(6, 12, 12, c)), jnp.float32) for c in (1, 3)]
  variables = model.init(jax.random.key(0), xs, train=False)
  perturbed = [xs[0], xs[1] + jnp.asarray(rng.normal(size=xs[1].shape), jnp.float32)]

  def branch_logits(inputs, cut):
    out = model.apply(variables, inputs, train=train, cut=jnp.int32(cut),
                      mutable=["batch_stats", FUSION_STATS] if train else False)
    return np.asarray((out[0] if train else out)[1])

  cut = branch_logits(xs, 0), branch_logits(perturbed, 0)
  np.testing.assert_array_equal(cut[0][0], cut[1][0])  # φ_0 does not see m_1 at all
  assert not np.allclose(cut[0][1], cut[1][1])  # φ_1 does
  normal = branch_logits(xs, -1), branch_logits(perturbed, -1)
  assert not np.allclose(normal[0][0], normal[1][0])  # without the cut, φ_0 sees m_1


def test_drop_substitutes_squeeze_vector():
  rng = np.random.default_rng(5)
  xs = _inputs(rng)
  module = MMTM()
  variables = module.init(jax.random.key(0), xs, train=False)
  constant = {"drop_0": {"train_mean": jnp.zeros(3)},
              "drop_1": {"train_mean": jnp.linspace(-1, 1, 5)}}
  out = module.apply({**variables, TRAIN_MEANS: constant}, xs, train=False,
                     drop=jnp.array([False, True]))
  batch = xs[0].shape[0]
  squeezed = [np.asarray(xs[0]).mean(axis=(1, 2)),
              np.tile(np.asarray(constant["drop_1"]["train_mean"]), (batch, 1))]
  expected, _ = _numpy_mmtm(variables["params"], xs, squeezed)
  for o, e in zip(out, expected):
    np.testing.assert_allclose(o, e, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="train_means"):
    module.apply(variables, xs, train=False, drop=jnp.array([False, True]))


def test_three_modalities():
  rng = np.random.default_rng(6)
  xs = [jnp.asarray(rng.normal(size=(2, 3, 3, c)), jnp.float32) for c in (2, 4, 6)]
  module = MMTM()
  variables = module.init(jax.random.key(0), xs, train=False)
  assert variables["params"]["squeeze"]["kernel"].shape == (12, 6)
  assert sorted(variables["params"]) == ["excite_0", "excite_1", "excite_2", "squeeze"]
  outs = module.apply(variables, xs, train=False, cut=jnp.int32(2))
  assert [o.shape for o in outs] == [x.shape for x in xs]
