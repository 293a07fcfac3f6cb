"""Conditional utilization rate on a hand-built model whose answer is derived by hand."""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import gml_jax


class Identity(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    return x


def _constructed_model():
  """Two 1-channel modalities, MMTM after an identity stage, linear heads.

  Branch 0 sees a constant input; its feature is gated by e_0 = sigmoid(20 relu(s_1) - 10),
  so it predicts class 1 exactly when m_1 = +1: it relies entirely on m_1. Branch 1 reads
  the sign of m_1 and ignores m_0 (e_1 = sigmoid(10), whatever the squeeze)."""
  model = gml_jax.FusionNetwork(
      branches=[gml_jax.Branch((Identity(),), 2), gml_jax.Branch((Identity(),), 2)],
      fusion_after=(0,),
  )
  params = {
      "fusion_0": {
          "squeeze": {"kernel": jnp.array([[0.0], [1.0]]), "bias": jnp.zeros(1)},
          "excite_0": {"kernel": jnp.array([[20.0]]), "bias": jnp.array([-10.0])},
          "excite_1": {"kernel": jnp.array([[0.0]]), "bias": jnp.array([10.0])},
      },
      "branches_0": {"head": {"kernel": jnp.array([[-1.0, 1.0]]), "bias": jnp.array([0.5, -0.5])}},
      "branches_1": {"head": {"kernel": jnp.array([[-1.0, 1.0]]), "bias": jnp.zeros(2)}},
  }
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), [jnp.zeros((1, 1, 1, 1))] * 2, train=False))
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), shapes["params"], params)
  stats = jax.tree.map(jnp.zeros_like, shapes["fusion_stats"])
  return model, {"params": params, "fusion_stats": stats}


def _batch(labels, mask=None):
  labels = np.asarray(labels, np.int32)
  m1 = np.where(labels == 1, 1.0, -1.0).astype(np.float32)[:, None, None, None]
  batch = {"inputs": (np.ones_like(m1), m1), "label": labels}
  return batch if mask is None else batch | {"mask": np.asarray(mask, np.float32)}


def test_known_utilization():
  model, variables = _constructed_model()
  # Training split: 6 of 10 real examples are class 1, so the mean squeeze of m_1 is 0.2,
  # e_0 = sigmoid(-6) and branch 0 predicts class 0 for every example once m_1 is
  # removed. The padded examples (mask 0, class 1) would flip that if they were counted.
  train = [_batch([1, 1, 1, 0, 0, 1, 1, 1], mask=[1, 1, 1, 1, 1, 0, 0, 0]),
           _batch([1, 1, 1, 0, 0, 1, 1, 1], mask=[1, 1, 1, 1, 1, 0, 0, 0])]
  test = [_batch([1, 0, 1, 0]), _batch([0, 0, 1, 0])]  # 3 of 8 are class 1
  result = gml_jax.conditional_utilization(model, variables, train, test)

  np.testing.assert_allclose(result.branch_accuracy, [1.0, 1.0])
  assert result.accuracy == 1.0
  # Without m_1, branch 0 predicts class 0 always: accuracy 5/8, u(m1|m0) = 3/8.
  np.testing.assert_allclose(result.ablated_accuracy[1, 0], 5 / 8)
  # m_0 is constant, so replacing it by its mean changes nothing for branch 1.
  np.testing.assert_allclose(result.ablated_accuracy[0, 1], 1.0)
  np.testing.assert_allclose(result.rates[1, 0], 3 / 8)
  np.testing.assert_allclose(result.rates[0, 1], 0.0)
  assert result.d_util == 3 / 8
  summary = result.as_dict()
  assert summary["u(m1|m0)"] == 3 / 8 and summary["u(m0|m1)"] == 0.0 and summary["d_util"] == 3 / 8


def test_squeeze_means_are_training_means():
  model, variables = _constructed_model()
  train = [_batch([1, 0, 1, 1]), _batch([0, 0], mask=[1, 0])]
  means = gml_jax.training_means(model, variables, train)
  np.testing.assert_allclose(means["fusion_0"]["drop_1"]["train_mean"], [(1 - 1 + 1 + 1 - 1) / 5])
  np.testing.assert_allclose(means["fusion_0"]["drop_0"]["train_mean"], [1.0])


def test_rates_of_a_branch_with_zero_accuracy_are_undefined():
  model, variables = _constructed_model()
  train = [_batch([1, 1, 0, 0])]
  # Labels opposite to the sign of m_1: both branches (which read that sign) are always wrong.
  flipped = _batch([1, 0, 1, 0])
  flipped = flipped | {"label": 1 - flipped["label"]}
  result = gml_jax.conditional_utilization(model, variables, train, [flipped])
  np.testing.assert_array_equal(result.branch_accuracy, [0.0, 0.0])
  summary = result.as_dict()
  assert summary["u(m1|m0)"] is summary["u(m0|m1)"] is summary["d_util"] is None
  assert summary["branch_1_accuracy"] == 0.0


def test_a_measured_baseline_replaces_the_unablated_pass():
  model, variables = _constructed_model()
  train = [_batch([1, 1, 1, 0, 0, 1, 1, 1], mask=[1, 1, 1, 1, 1, 0, 0, 0])]
  test = [_batch([1, 0, 1, 0]), _batch([0, 0, 1, 0])]
  full = gml_jax.conditional_utilization(model, variables, train, test)
  # The accuracies an evaluation already reported, from the eval step on the same batches.
  eval_step = jax.jit(gml_jax.make_eval_step(model))
  state = gml_jax.TrainState(params=variables["params"], opt_state=None,
                             model_state={"fusion_stats": variables["fusion_stats"]})
  sums = jax.tree.map(lambda *xs: sum(xs), *[eval_step(state, b) for b in test])
  baseline = (float(sums["correct"] / sums["count"]),
              np.asarray(sums["branch_correct"] / sums["count"]))
  reused = gml_jax.conditional_utilization(model, variables, train, test, baseline=baseline)
  np.testing.assert_array_equal(reused.rates, full.rates)
  np.testing.assert_array_equal(reused.ablated_accuracy, full.ablated_accuracy)
  assert reused.as_dict() == full.as_dict()
  # The rates are taken relative to the given baseline, not to a pass of their own.
  other = gml_jax.conditional_utilization(model, variables, train, test, baseline=(0.5, [0.5, 1.0]))
  np.testing.assert_allclose(other.rates[1, 0], (0.5 - 5 / 8) / 0.5)
  np.testing.assert_array_equal(other.branch_accuracy, [0.5, 1.0])


class ThreeModalities(nn.Module):
  """Three encoders; each branch gets a projection of its neighbours. ``shared``: one cut
  on the projection of the concatenated neighbours (sources: both); else one projection
  and one cut per source, summed."""

  shared: bool

  @nn.compact
  def __call__(self, inputs, *, train, cut=-1, drop=None):
    h = [nn.relu(nn.Dense(4, name=f"enc_{k}")(x)) for k, x in enumerate(inputs)]
    logits = []
    for k in range(3):
      others = [j for j in range(3) if j != k]
      if self.shared:
        signal = nn.Dense(4, name=f"proj_{k}")(jnp.concatenate([h[j] for j in others], -1))
        cross = gml_jax.CrossModalCut(branch=k, name=f"cut_{k}")(signal, train=train, cut=cut,
                                                                 drop=drop)
      else:
        cross = sum(gml_jax.CrossModalCut(branch=k, sources=(j,), name=f"cut_{k}_{j}")(
            nn.Dense(4, name=f"proj_{k}_{j}")(h[j]), train=train, cut=cut, drop=drop)
            for j in others)
      logits.append(nn.Dense(3, name=f"head_{k}")(h[k] + cross))
    branch_logits = jnp.stack(logits)
    return branch_logits.mean(0), branch_logits


def test_equal_rates_from_one_cut_over_several_sources_are_warned_about():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 24).astype(np.int32)
  batch = {"inputs": tuple(rng.normal(size=(24, 2)).astype(np.float32) + labels[:, None] * s
                           for s in (1.0, 0.5, 0.2)), "label": labels}
  shared = ThreeModalities(shared=True)
  variables = shared.init(jax.random.key(0), batch["inputs"], train=False)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    u = gml_jax.conditional_utilization(shared, variables, [batch], [batch])
  assert [str(w.message) for w in caught] == list(u.notes)
  assert re.match(r"u\(m1\|m0\) and u\(m2\|m0\) are equal because dropping m1 or m2.*"
                  r"one cut carries both.*sources=\(1,\), sources=\(2,\)", u.notes[0])
  assert u.ablated_accuracy[1, 0] == u.ablated_accuracy[2, 0]  # the silent equality
  assert len(u.notes) == 3  # one per branch: each has one cut over its two neighbours
  separate = ThreeModalities(shared=False)
  variables = separate.init(jax.random.key(0), batch["inputs"], train=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    u = gml_jax.conditional_utilization(separate, variables, [batch], [batch])
  assert u.notes == ()
