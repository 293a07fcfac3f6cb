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


# --------------------------------------------------------------------------------------
# The authors' recipe: joint head, fused loss, window, scope, unbiased noise


def test_joint_head_scores_are_each_modalitys_half_of_the_head():
  """OGM-GE's late fusion: ŷ = [f_0, f_1] W + b, ŷ_k = f_k W_k + b / 2, by hand in NumPy,
  through the network, the fused-loss train step and the scores OGM-GE sees."""
  model = gml_jax.models.build("small_cnn", 5, 2, fusion=False, head="joint", width=4)
  rng = np.random.default_rng(3)
  label = rng.integers(0, 5, 8).astype(np.int32)
  inputs = (rng.normal(size=(8, 12, 12, 1)).astype(np.float32),
            rng.normal(size=(8, 12, 12, 3)).astype(np.float32))
  tx = gml_jax.ogm_ge(optax.sgd(0.1), gml_jax.group_labels, alpha=0.8, noise=False)
  state = gml_jax.create_train_state(model, tx, [x[:1] for x in inputs])
  head = state.params["head"]
  head = {"kernel": head["kernel"], "bias": jnp.asarray(rng.normal(size=5), jnp.float32)}
  state = state.replace(params={**state.params, "head": head})
  assert gml_jax.group_labels(state.params)["head"] == {"kernel": "other", "bias": "other"}

  # The branches' pooled features, read from the last stage of each branch.
  (logits, shares), inter = model.apply(state.variables, inputs, train=True,
                                        mutable=["batch_stats", "intermediates"],
                                        capture_intermediates=True)
  features = [np.asarray(inter["intermediates"][f"branches_{k}"]["stages_2"]["__call__"][0],
                         np.float64).mean(axis=(1, 2)) for k in (0, 1)]
  w, b = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
  d = features[0].shape[1]
  expected = [features[0] @ w[:d] + b / 2, features[1] @ w[d:] + b / 2]
  np.testing.assert_allclose(shares, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits, np.concatenate(features, axis=1) @ w + b, rtol=1e-4,
                             atol=1e-5)

  step = jax.jit(gml_jax.make_train_step(model, tx, loss="fused"))
  _, metrics = step(state, {"inputs": inputs, "label": label})
  fused = np.concatenate(features, axis=1) @ w + b
  log_p = fused - np.log(np.exp(fused).sum(axis=1, keepdims=True))
  assert float(metrics["loss"]) == pytest.approx(-log_p[np.arange(8), label].mean(), rel=1e-4)
  probs = [np.exp(e) / np.exp(e).sum(axis=1, keepdims=True) for e in expected]
  scores = [p[np.arange(8), label].sum() for p in probs]
  np.testing.assert_allclose(metrics["ogm_ratio"], [scores[0] / scores[1], scores[1] / scores[0]],
                             rtol=1e-4)


def test_fused_loss_trains_the_fused_output_alone():
  """loss="fused": the gradient is that of CE(ŷ) (the head's bias gradient is
  mean(softmax(ŷ) - onehot(y)), by hand); the branches' losses are only reported."""
  model = gml_jax.models.build("small_cnn", 3, 2, fusion=False, head="joint", width=4)
  rng = np.random.default_rng(0)
  label = np.array([0, 2, 1, 2], np.int32)
  inputs = (rng.normal(size=(4, 8, 8, 1)).astype(np.float32),
            rng.normal(size=(4, 8, 8, 3)).astype(np.float32))
  state = gml_jax.create_train_state(model, optax.sgd(1.0), [x[:1] for x in inputs])
  (logits, _), _ = model.apply(state.variables, inputs, train=True, mutable=["batch_stats"])
  p = np.exp(np.asarray(logits, np.float64))
  p /= p.sum(axis=1, keepdims=True)
  bias_grad = (p - np.eye(3)[label]).mean(axis=0)
  new, metrics = gml_jax.make_train_step(model, optax.sgd(1.0), loss="fused")(
      state, {"inputs": inputs, "label": label})
  np.testing.assert_allclose(state.params["head"]["bias"] - new.params["head"]["bias"],
                             bias_grad, rtol=1e-4, atol=1e-6)
  assert metrics["branch_loss"].shape == (2,)
  with pytest.raises(ValueError, match=r"loss must be one of \('branches', 'fused', 'both'\)"):
    gml_jax.make_train_step(model, optax.sgd(1.0), loss="sum")


@pytest.mark.parametrize("scope", ["branch", "kernels"])
def test_window_and_scope_decide_exactly_what_is_modulated(scope):
  """Updates 2 and 3 of 6 modulate (window (2, 4)); the others pass every gradient
  unchanged. Inside, exactly the scope is scaled and noised: every main:k leaf, or its
  leaves of rank >= 2 (a dense and a 4-D and a 5-D kernel, not biases or scales)."""
  rng = np.random.default_rng(0)
  shapes = {"dense0": (3, 4), "bias0": (4,), "conv1": (2, 2, 1, 3), "conv3d1": (1, 2, 2, 1, 3),
            "scale1": (3,), "head": (5, 2)}
  labels = {"dense0": "main:0", "bias0": "main:0", "conv1": "main:1", "conv3d1": "main:1",
            "scale1": "main:1", "head": "other"}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  tx = gml_jax.ogm_ge(optax.sgd(-1.0), labels, alpha=0.5, scope=scope, window=(2, 4))
  update = jax.jit(lambda g, s: tx.update(g, s, params, scores=jnp.array([6.0, 3.0])))
  state = tx.init(params)
  in_scope = {k for k in shapes
              if labels[k] != "other" and (scope == "branch" or len(shapes[k]) >= 2)}
  for step in range(6):
    updates, state = update(grads, state)
    if step in (2, 3):
      np.testing.assert_allclose(state.coefficients, _np_coefficients([6.0, 3.0], 0.5), rtol=1e-6)
      changed = {k for k in shapes if not np.array_equal(updates[k], grads[k])}
      assert changed == in_scope
    else:
      np.testing.assert_array_equal(state.coefficients, [1.0, 1.0])
      for k in shapes:
        np.testing.assert_array_equal(updates[k], grads[k])
    np.testing.assert_allclose(state.ratios, [2.0, 0.5], rtol=1e-6)  # measured throughout


def test_noise_uses_the_unbiased_standard_deviation():
  # By hand: entries 1 and 3, mean 2, Σ (x - mean)² = 2, unbiased variance 2 / (2 - 1).
  assert float(gml_jax.modulation.noise_scale(jnp.array([1.0, 3.0]))) == pytest.approx(
      np.sqrt(2.0) + 1e-8, rel=1e-6)
  assert float(gml_jax.modulation.noise_scale(jnp.array([5.0]))) == pytest.approx(1e-8)
  # The transform draws with it: 2,000 updates of a 2-entry leaf (equal scores, so the
  # coefficient is 1) give noise of standard deviation √2 (the biased estimate would be 1).
  labels = {"a": "main:0", "b": "main:1"}
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  grads = {"a": jnp.array([1.0, 3.0]), "b": jnp.zeros(2)}
  tx = gml_jax.ogm_ge(optax.sgd(-1.0), labels, alpha=0.5, seed=1)

  def body(state, _):
    updates, state = tx.update(grads, state, params, scores=jnp.array([1.0, 1.0]))
    return state, updates["a"] - grads["a"]

  _, noise = jax.lax.scan(body, tx.init(params), None, length=2000)
  assert np.std(np.asarray(noise)) == pytest.approx(np.sqrt(2.0), rel=0.05)


def test_bad_window_and_scope_are_named():
  with pytest.raises(ValueError, match=r"scope must be one of \('branch', 'kernels'\)"):
    gml_jax.ogm_ge(optax.sgd(1.0), {}, alpha=0.5, scope="encoder")
  with pytest.raises(ValueError, match=r"window must be None .* got \(5, 2\)"):
    gml_jax.ogm_ge(optax.sgd(1.0), {}, alpha=0.5, window=(5, 2))
