"""OGM-GE (gml_jax.ogm_ge) against NumPy computations of the published formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gml_jax


def _np_coefficients(scores, alpha, continuous=False):
  """Peng et al. (CVPR 2022), Eq. 10, written out by hand: ρ_k = s_k / mean of the others,
  k = 1 - tanh(α ρ) (or α (ρ - 1)) where ρ > 1, else 1."""
  scores = np.asarray(scores, np.float64)
  out = []
  for k, s in enumerate(scores):
    rho = s / np.mean(np.delete(scores, k))
    lead = rho - 1 if continuous else rho
    out.append(1 - np.tanh(alpha * lead) if rho > 1 else 1.0)
  return np.array(out)


def _tree(n, size=3, seed=0):
  """Parameters and gradients of n branches plus a shared fusion leaf and an 'other' leaf."""
  rng = np.random.default_rng(seed)
  names = [f"b{k}" for k in range(n)] + ["fuse", "extra"]
  labels = {f"b{k}": f"main:{k}" for k in range(n)} | {"fuse": "fusion:shared",
                                                      "extra": "other"}
  params = {name: jnp.asarray(rng.normal(size=size), jnp.float32) for name in names}
  grads = {name: jnp.asarray(rng.normal(size=size), jnp.float32) for name in names}
  return params, grads, labels


@pytest.mark.parametrize("scores,alpha,continuous", [
    ([6.0, 3.0], 0.5, False),  # ρ = (2, 0.5): only modality 0 is damped
    ([6.0, 3.0], 0.5, True),
    ([2.5, 7.5], 0.1, False),
    ([4.0, 2.0, 2.0], 0.8, False),  # three modalities: ρ = (2, 2/3, 2/3)
    ([3.0, 3.0, 0.0], 0.8, False),  # ρ = (2, 2, 0): two modalities damped
    ([3.0, 3.0], 0.8, False),  # ρ = 1: nothing damped (the paper's "ρ > 1")
])
def test_coefficients_scale_each_branch_as_published(scores, alpha, continuous):
  n = len(scores)
  params, grads, labels = _tree(n)
  tx = gml_jax.ogm_ge(optax.sgd(1.0), labels, alpha=alpha, noise=False, continuous=continuous)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, scores=jnp.asarray(scores))
  expected = _np_coefficients(scores, alpha, continuous)
  np.testing.assert_allclose(state.coefficients, expected, rtol=1e-6)
  for k in range(n):
    np.testing.assert_allclose(updates[f"b{k}"], -expected[k] * np.asarray(grads[f"b{k}"]),
                               rtol=1e-6)
  for name in ("fuse", "extra"):  # not a branch: passes unchanged
    np.testing.assert_allclose(updates[name], -np.asarray(grads[name]), rtol=1e-6)
  rho = [s / np.mean(np.delete(scores, k)) for k, s in enumerate(scores)]
  np.testing.assert_allclose(state.ratios, rho, rtol=1e-6)


def test_generalisation_noise_has_the_gradients_scale_and_is_reproducible():
  rng = np.random.default_rng(1)
  params = {"b0": jnp.zeros(100_000), "b1": jnp.zeros(100_000), "fuse": jnp.zeros(1000)}
  grads = {"b0": jnp.asarray(rng.normal(0, 0.3, 100_000), jnp.float32),
           "b1": jnp.asarray(rng.normal(0, 2.0, 100_000), jnp.float32),
           "fuse": jnp.asarray(rng.normal(0, 1.0, 1000), jnp.float32)}
  labels = {"b0": "main:0", "b1": "main:1", "fuse": "fusion:shared"}
  scores = jnp.array([8.0, 2.0])  # modality 0 leads: k_0 = 1 - tanh(0.5 * 4)
  coeff = _np_coefficients([8.0, 2.0], 0.5)

  def step(seed, state=None):
    tx = gml_jax.ogm_ge(optax.sgd(-1.0), labels, alpha=0.5, seed=seed)  # updates = grads
    state = tx.init(params) if state is None else state
    return tx.update(grads, state, params, scores=scores)

  updates, state = step(seed=3)
  for k, sd in ((0, 0.3), (1, 2.0)):  # both branches get noise, damped or not
    noise = np.asarray(updates[f"b{k}"]) - coeff[k] * np.asarray(grads[f"b{k}"])
    assert abs(noise.std() / np.asarray(grads[f"b{k}"]).std() - 1) < 0.02
    assert abs(noise.mean()) < 0.02 * sd
  np.testing.assert_array_equal(updates["fuse"], grads["fuse"])  # fusion leaves: no noise
  np.testing.assert_array_equal(step(seed=3)[0]["b0"], updates["b0"])  # same (seed, step)
  assert not np.allclose(step(seed=4)[0]["b0"], updates["b0"])  # another seed
  assert not np.allclose(step(seed=3, state=state)[0]["b0"], updates["b0"])  # next step
  noise0 = np.asarray(updates["b0"]) - coeff[0] * np.asarray(grads["b0"])
  noise1 = np.asarray(updates["b1"]) - coeff[1] * np.asarray(grads["b1"])
  assert abs(np.corrcoef(noise0, noise1)[0, 1]) < 0.02  # independent draws per leaf


def test_momentum_sees_the_modulated_gradient():
  params, _, labels = _tree(2)
  tx = gml_jax.ogm_ge(optax.sgd(0.1, momentum=0.9), labels, alpha=1.0, noise=False)
  state = tx.init(params)
  velocity = {k: np.zeros(3) for k in params}
  rng = np.random.default_rng(5)
  for scores in ([5.0, 1.0], [1.0, 4.0], [2.0, 2.0]):
    grads = {k: jnp.asarray(rng.normal(size=3), jnp.float32) for k in params}
    updates, state = tx.update(grads, state, params, scores=jnp.asarray(scores))
    coeff = _np_coefficients(scores, 1.0)
    for name in params:
      scale = coeff[int(name[1])] if name in ("b0", "b1") else 1.0
      velocity[name] = 0.9 * velocity[name] + scale * np.asarray(grads[name])
      np.testing.assert_allclose(updates[name], -0.1 * velocity[name], rtol=1e-5, atol=1e-7)


def test_bad_arguments_are_named():
  params, grads, labels = _tree(2)
  with pytest.raises(ValueError, match="alpha must be a number > 0"):
    gml_jax.ogm_ge(optax.sgd(1.0), labels, alpha=0.0)
  tx = gml_jax.ogm_ge(optax.sgd(1.0), labels, alpha=0.5)
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs the branches' scores"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match=r"scores must have shape \(2,\)"):
    tx.update(grads, state, params, scores=jnp.ones(3))
  with pytest.raises(ValueError, match="N >= 2 modalities"):
    gml_jax.ogm_ge(optax.sgd(1.0), {k: "main:0" for k in labels}, alpha=0.5).init(params)


def test_true_class_scores_by_hand():
  logits = np.random.default_rng(2).normal(size=(2, 5, 4)).astype(np.float32)
  labels = np.array([0, 3, 1, 1, 2], np.int32)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  expected = [sum(probs[k, i, labels[i]] for i in range(5)) for k in range(2)]
  np.testing.assert_allclose(gml_jax.true_class_scores(jnp.asarray(logits), labels), expected,
                             rtol=1e-5)


def _late_fusion_step(devices, tx_fn):
  model = gml_jax.models.build("small_cnn", 4, 2, fusion=False, width=4)
  tx = tx_fn()
  mesh = gml_jax.data_mesh(devices)
  state = gml_jax.replicate(gml_jax.create_train_state(
      model, tx, [jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 3))]), mesh)
  step = gml_jax.compile_train_step(gml_jax.make_train_step(model, tx), mesh)
  rng = np.random.default_rng(0)
  label = rng.integers(0, 4, 16).astype(np.int32)
  batch = {"inputs": (rng.normal(size=(16, 8, 8, 1)).astype(np.float32) + label[:, None, None,
                                                                              None],
                      rng.normal(size=(16, 8, 8, 3)).astype(np.float32)), "label": label}
  before = jax.device_get(state)
  state, metrics = step(state, gml_jax.shard_batch(batch, mesh))
  return model, before, jax.device_get(state), jax.device_get(metrics), batch


def test_train_step_feeds_the_scores_of_the_global_batch_on_eight_devices():
  tx_fn = lambda: gml_jax.ogm_ge(optax.sgd(0.1), gml_jax.group_labels, alpha=0.8, seed=7)
  model, before, after, metrics, batch = _late_fusion_step(jax.devices(), tx_fn)
  # The scores the transform saw: from the branch logits of the parameters before the step.
  _, branch_logits = model.apply(before.variables, batch["inputs"], train=True,
                                 mutable=["batch_stats"])[0]
  probs = jax.nn.softmax(np.asarray(branch_logits, np.float64), axis=-1)
  scores = probs[:, np.arange(16), batch["label"]].sum(axis=1)
  np.testing.assert_allclose(metrics["ogm_ratio"], [scores[0] / scores[1], scores[1] / scores[0]],
                             rtol=1e-4)
  np.testing.assert_allclose(metrics["ogm_coefficient"], _np_coefficients(scores, 0.8),
                             rtol=1e-4)
  assert "d_speed" not in metrics and int(metrics["target"]) == -1  # no balancing: no speeds
  # Data parallelism: one device takes the same step, noise included.
  _, _, one_after, one_metrics, _ = _late_fusion_step(jax.devices()[:1], tx_fn)
  np.testing.assert_allclose(one_metrics["ogm_ratio"], metrics["ogm_ratio"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one_after.params), jax.tree.leaves(after.params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_inside_vanilla_balancing_it_modulates_and_the_speeds_use_the_raw_gradient():
  params, grads, labels = _tree(2)
  labels = labels | {"extra": "fusion:0"}
  scores = jnp.array([1.0, 3.0])
  alone = gml_jax.ogm_ge(optax.sgd(1.0), labels, alpha=0.5, noise=False)
  wrapped = gml_jax.balanced_multimodal(alone, labels, method="vanilla")
  expected, _ = alone.update(grads, alone.init(params), params, scores=scores)
  updates, state = wrapped.update(grads, wrapped.init(params), params, scores=scores)
  for name in params:
    np.testing.assert_allclose(updates[name], expected[name], rtol=1e-6)
  sq = lambda tree, names: sum(float(np.sum(np.square(tree[n]))) for n in names)
  mu_main_1 = sq(grads, ["b1"]) / sq(params, ["b1"])  # raw, although b1's update was damped
  np.testing.assert_allclose(state.mu_main[1], mu_main_1, rtol=1e-5)
  assert gml_jax.modulation.ogm_state(state).coefficients[1] < 1
