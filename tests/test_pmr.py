"""PMR (gml_jax.pmr) against NumPy computations of the rule, written out by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gml_jax
from gml_jax import epochs, pmr


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_stats(features, label, protos, alpha, rule="authors"):
  """Per modality: logits −‖f − p‖, the summed true-class probability s_k, PCE_k (mean CE),
  ρ_k = s_k / mean of the others, the coefficients, and the added loss."""
  scores, pce = [], []
  for f, p in zip(features, protos):
    logits = -np.sqrt(((f[:, None, :] - p[None, :, :]) ** 2).sum(-1))
    probs = _np_softmax(logits)
    true = probs[np.arange(len(label)), label]
    scores.append(true.sum())
    pce.append(-np.log(true).mean())
  scores, pce = np.array(scores), np.array(pce)
  rho = np.array([s / np.mean(np.delete(scores, k)) for k, s in enumerate(scores)])
  if rule == "authors":
    c = (rho < 1).astype(float)
  else:
    c = np.where(rho < 1, np.minimum(1.0, 1.0 / rho - 1.0), 0.0)
  return scores, rho, alpha * c, pce, float(np.sum(alpha * c * pce))


def _batch(seed=0, dims=(2, 3), n_per_class=(2, 3, 1)):
  rng = np.random.default_rng(seed)
  label = np.concatenate([np.full(m, c) for c, m in enumerate(n_per_class)]).astype(np.int32)
  features = tuple(rng.normal(size=(len(label), d)).astype(np.float32) + label[:, None]
                   for d in dims)
  return features, label


# Compiled once per shape: the eager operations of these small functions, each compiled
# on first use, would cost tens of seconds.
_epoch_start = jax.jit(lambda state, sums: epochs.epoch_start(state, prototype_sums=sums))
_stats = jax.jit(lambda state, f, label: state.stats(features=f, label=label))
_loss = jax.jit(lambda state, f, label: state.loss_term(features=f, label=label))
_loss_grad = jax.jit(jax.grad(lambda f, state, label: state.loss_term(features=f, label=label)))
_sums = jax.jit(pmr.prototype_sums, static_argnums=2)


def _started(tx, sums, params=None):
  state = tx.init(params if params is not None else {"w": jnp.zeros(2)})
  return _epoch_start(state, sums)


def test_prototypes_of_a_tiny_labelled_batch_by_hand():
  features, label = _batch(dims=(2, 3), n_per_class=(2, 3, 0))  # class 2 absent
  sums = _sums(features, label, 3)
  np.testing.assert_array_equal(sums.counts, [2, 3, 0])
  tx = pmr.pmr(optax.sgd(0.1), num_classes=3, feature_dims=(2, 3), alpha=1.0)
  state = _started(tx, sums)
  for f, p in zip(features, state.prototypes):
    np.testing.assert_allclose(p[0], f[label == 0].mean(0), rtol=1e-6)
    np.testing.assert_allclose(p[1], f[label == 1].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(p[2], 0.0)  # never seen: no prototype
  np.testing.assert_array_equal(state.valid, [True, True, False])
  # Padding examples (mask 0) are not counted.
  masked = _sums(features, label, 3, mask=(label != 1).astype(np.float32))
  np.testing.assert_array_equal(masked.counts, [2, 0, 0])
  np.testing.assert_allclose(masked.sums[0][0], features[0][label == 0].sum(0), rtol=1e-6)


def test_momentum_from_the_second_epoch_and_a_class_absent_from_the_pass_keeps_its_own():
  f1, l1 = _batch(seed=1, dims=(2, 2), n_per_class=(2, 2, 0))
  f2, l2 = _batch(seed=2, dims=(2, 2), n_per_class=(0, 3, 2))  # class 0 absent now
  tx = pmr.pmr(optax.sgd(0.1), num_classes=3, feature_dims=(2, 2), alpha=1.0, momentum=0.25)
  state = _started(tx, _sums(f1, l1, 3))
  first = [np.asarray(p) for p in state.prototypes]
  for f in f1:  # the first epoch's prototypes are plain means (no earlier one to average)
    np.testing.assert_allclose(first[0][1], f1[0][l1 == 1].mean(0), rtol=1e-6)
    del f
  state = _epoch_start(state, _sums(f2, l2, 3))
  for k in range(2):
    p = np.asarray(state.prototypes[k])
    np.testing.assert_allclose(p[0], first[k][0], rtol=1e-6)  # absent: kept
    np.testing.assert_allclose(p[1], 0.75 * f2[k][l2 == 1].mean(0) + 0.25 * first[k][1],
                               rtol=1e-6)
    np.testing.assert_allclose(p[2], f2[k][l2 == 2].mean(0), rtol=1e-6)  # new: plain mean
  np.testing.assert_array_equal(state.valid, [True, True, True])
  assert int(state.epochs_started) == 2


@pytest.mark.parametrize("rule", ["authors", "clipped"])
def test_prototype_scores_ratio_and_the_added_loss_of_the_slow_modality_only(rule):
  features, label = _batch(seed=3, dims=(2, 3), n_per_class=(3, 3, 2))
  protos_features, _ = _batch(seed=4, dims=(2, 3), n_per_class=(3, 3, 2))
  # Modality 1's features are noisier than its prototypes suggest: the slow one.
  features = (features[0], features[1] + np.random.default_rng(5).normal(
      0, 3.0, features[1].shape).astype(np.float32))
  sums = _sums(protos_features, label, 3)
  tx = pmr.pmr(optax.sgd(0.1), num_classes=3, feature_dims=(2, 3), alpha=2.5, rule=rule)
  state = _started(tx, sums)
  protos = [np.asarray(p, np.float64) for p in state.prototypes]
  scores, rho, coeff, pce, loss = _np_stats([np.float64(f) for f in features], label, protos,
                                            2.5, rule)
  assert coeff[0] == 0 and coeff[1] > 0  # only the slow modality gains a term
  stats = _stats(state, features, label)
  np.testing.assert_allclose(stats.scores, scores, rtol=1e-5)
  np.testing.assert_allclose(stats.ratios, rho, rtol=1e-5)
  np.testing.assert_allclose(stats.coefficients, coeff, rtol=1e-5)
  np.testing.assert_allclose(stats.pce, pce, rtol=1e-5)
  np.testing.assert_allclose(_loss(state, features, label), loss, rtol=1e-5)
  # The gradient: none into the fast modality; into the slow one, α_1 ∂PCE_1/∂f by hand:
  # ∂/∂f_i of −log softmax(ℓ_i)_y = Σ_c (q_ic − [c = y_i]) ∂ℓ_ic/∂f_i,
  # with ∂ℓ_ic/∂f_i = −(f_i − p_c)/d_ic.
  grads = _loss_grad(features, state, label)
  np.testing.assert_array_equal(grads[0], 0.0)
  f, p = np.float64(features[1]), protos[1]
  diff = f[:, None, :] - p[None]
  dist = np.sqrt((diff ** 2).sum(-1))
  q = _np_softmax(-dist) - np.eye(3)[label]
  expected = coeff[1] * np.einsum("bc,bcd->bd", q, -diff / dist[..., None]) / len(label)
  np.testing.assert_allclose(grads[1], expected, rtol=1e-4, atol=1e-7)


def test_equal_scores_add_nothing():
  # Two identical modalities: equal scores, ρ = 1, neither is slow.
  features, label = _batch(seed=6, dims=(2,), n_per_class=(2, 2, 2))
  features = (features[0], features[0])
  tx = pmr.pmr(optax.sgd(0.1), num_classes=3, feature_dims=(2, 2), alpha=3.0)
  state = _started(tx, _sums(features, label, 3))
  stats = _stats(state, features, label)
  np.testing.assert_allclose(stats.ratios, [1.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(stats.coefficients, [0.0, 0.0])
  assert float(stats.loss) == 0.0


def test_three_modalities_by_hand():
  features, label = _batch(seed=7, dims=(2, 2, 3), n_per_class=(2, 2, 2))
  rng = np.random.default_rng(8)
  noisy = tuple(f + rng.normal(0, s, f.shape).astype(np.float32)
                for f, s in zip(features, (0.1, 2.0, 4.0)))
  tx = pmr.pmr(optax.sgd(0.1), num_classes=3, feature_dims=(2, 2, 3), alpha=1.5,
               rule="clipped")
  state = _started(tx, _sums(features, label, 3))
  protos = [np.asarray(p, np.float64) for p in state.prototypes]
  scores, rho, coeff, _, loss = _np_stats([np.float64(f) for f in noisy], label, protos, 1.5,
                                          "clipped")
  stats = _stats(state, noisy, label)
  np.testing.assert_allclose(stats.ratios, rho, rtol=1e-5)
  np.testing.assert_allclose(stats.coefficients, coeff, rtol=1e-5)
  np.testing.assert_allclose(stats.loss, loss, rtol=1e-5)
  assert coeff[0] == 0 and np.count_nonzero(coeff) >= 1


def test_a_batch_class_without_prototype_counts_in_nothing_and_before_any_pass_no_nan():
  features, label = _batch(seed=9, dims=(2, 2), n_per_class=(2, 2, 2))
  keep = label != 2
  tx = pmr.pmr(optax.sgd(0.1), num_classes=3, feature_dims=(2, 2), alpha=1.0)
  state = _started(tx, _sums(tuple(f[keep] for f in features), label[keep], 3))
  assert not bool(state.valid[2])
  # Class 2 has no prototype: its examples are left out; the rest are as if alone, over
  # the two classes that have prototypes.
  protos = [np.asarray(p, np.float64)[:2] for p in state.prototypes]
  scores, rho, coeff, _, loss = _np_stats([np.float64(f[keep]) for f in features],
                                          label[keep], protos, 1.0)
  stats = _stats(state, features, label)
  np.testing.assert_allclose(stats.scores, scores, rtol=1e-5)
  np.testing.assert_allclose(stats.loss, loss, rtol=1e-5)
  # Before the first epoch hook no class has a prototype: the term and its gradient are 0.
  fresh = tx.init({"w": jnp.zeros(2)})
  grads = _loss_grad(features, fresh, label)
  assert float(_loss(fresh, features, label)) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_window_of_epochs_and_entropy_term_by_hand():
  features, label = _batch(seed=10, dims=(2, 2), n_per_class=(2, 2, 2))
  noisy = (features[0], features[1] + np.random.default_rng(11).normal(
      0, 2.0, features[1].shape).astype(np.float32))
  sums = _sums(features, label, 3)
  tx = pmr.pmr(optax.sgd(0.1), num_classes=3, feature_dims=(2, 2), alpha=1.0, epochs=(1, 2),
               entropy=0.5, entropy_epochs=1)
  state = tx.init({"w": jnp.zeros(2)})
  losses, weights = [], []
  for _ in range(4):  # epochs 0, 1, 2, 3
    state = _epoch_start(state, sums)
    stats = _stats(state, noisy, label)
    losses.append(float(stats.loss))
    weights.append(np.asarray(stats.entropy_weights))
  assert losses[0] == 0.0 and losses[3] == 0.0 and losses[1] != 0.0 and losses[2] != 0.0
  # Epoch 1 (the window's first): the fast modality 0 gains −μ·H_0 (authors' rule: c = 1).
  protos = [np.asarray(p, np.float64) for p in state.prototypes]
  _, _, coeff, pce, _ = _np_stats([np.float64(f) for f in noisy], label, protos, 1.0)
  q = _np_softmax(-np.sqrt(((np.float64(noisy[0])[:, None] - protos[0][None]) ** 2).sum(-1)))
  entropy0 = -(q * np.log(q)).sum(-1).mean()
  np.testing.assert_allclose(weights[1], [0.5, 0.0])
  np.testing.assert_allclose(losses[1], coeff[1] * pce[1] - 0.5 * entropy0, rtol=1e-5)
  np.testing.assert_array_equal(weights[2], [0.0, 0.0])  # entropy_epochs = 1
  np.testing.assert_allclose(losses[2], coeff[1] * pce[1], rtol=1e-5)


class _TwoBranches(nn.Module):
  """A tiny Linen model that sows its branches' features as PMR reads them."""

  @nn.compact
  def __call__(self, inputs, *, train, cut=-1, drop=None):
    feats = tuple(nn.relu(nn.Dense(3, name=f"enc_{k}")(x)) for k, x in enumerate(inputs))
    for f in feats:  # one sow per branch, in branch order (gml_jax.extras' features)
      self.sow("intermediates", pmr.FEATURES, f)
    branch = jnp.stack([nn.Dense(2, name=f"head_{k}")(f) for k, f in enumerate(feats)])
    return jnp.mean(branch, axis=0), branch


def test_a_hand_written_step_with_a_tiny_model():
  rng = np.random.default_rng(12)
  inputs = (rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32))
  label = np.array([0, 1, 0, 1, 1, 0], np.int32)
  model = _TwoBranches()
  params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(inputs)["params"]
  assert pmr.feature_dims(model, {"params": params}, inputs) == (3, 3)
  tx = pmr.pmr(optax.sgd(0.5), num_classes=2, feature_dims=(3, 3), alpha=2.0)
  state = tx.init(params)
  step = jax.jit(pmr.make_prototype_step(model, num_classes=2))
  batches = [{"inputs": tuple(x[:3] for x in inputs), "label": label[:3]},
             {"inputs": tuple(x[3:] for x in inputs), "label": label[3:]}]
  sums = pmr.prototype_pass(step, {"params": params}, batches)
  state = _epoch_start(state, sums)
  feats = [np.maximum(x @ np.asarray(params[f"enc_{k}"]["kernel"])
                      + np.asarray(params[f"enc_{k}"]["bias"]), 0) for k, x in enumerate(inputs)]
  for k in range(2):  # the prototypes are the class means of the model's features
    for c in range(2):
      np.testing.assert_allclose(state.prototypes[k][c], feats[k][label == c].mean(0),
                                 rtol=1e-5, atol=1e-6)

  def loss_fn(p):
    (logits, _), inter = model.apply({"params": p}, inputs, train=True,
                                     mutable=["intermediates"])
    features = pmr.sown_features(inter["intermediates"])
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, label))
    return ce + state.loss_term(features=features, label=label), features

  @jax.jit
  def train_step(params, state):
    grads, features = jax.grad(loss_fn, has_aux=True)(params)
    updates, new_state = tx.update(grads, state, params, features=features, label=label)
    return grads, updates, new_state

  grads, updates, new_state = train_step(params, state)
  # The update passes the gradients through and records the step's statistics.
  for leaf_u, leaf_g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    np.testing.assert_allclose(leaf_u, -0.5 * np.asarray(leaf_g), rtol=1e-6)
  _, rho, coeff, _, _ = _np_stats(feats, label, [np.asarray(p) for p in state.prototypes], 2.0)
  np.testing.assert_allclose(new_state.ratios, rho, rtol=1e-4)
  np.testing.assert_allclose(new_state.coefficients, coeff)
  metrics = new_state.train_metrics()
  assert set(metrics) == set(pmr.PMRState.METRICS)
  assert pmr.pmr_state((optax.EmptyState(), new_state)) is not None


def test_fusion_network_sows_the_features_its_heads_read():
  model = gml_jax.models.build("small_cnn", 4, 2, fusion=False, width=4)
  inputs = (jnp.ones((2, 8, 8, 1)), jnp.ones((2, 8, 8, 3)) * 0.5)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(inputs)
  assert "intermediates" not in variables  # init does not keep what is sown
  (_, branch_logits), state = jax.jit(lambda v, x: model.apply(
      v, x, train=False, mutable=["intermediates"]))(variables, inputs)
  features = pmr.sown_features(state["intermediates"])
  assert len(features) == 2
  for k, f in enumerate(features):  # each branch's head reads exactly these features
    head = variables["params"][f"branches_{k}"]["head"]
    np.testing.assert_allclose(np.asarray(f) @ np.asarray(head["kernel"]) + head["bias"],
                               branch_logits[k], rtol=1e-4, atol=1e-5)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="feature_dims must list"):
    pmr.pmr(optax.sgd(1.0), num_classes=2, feature_dims=(3,), alpha=1.0)
  with pytest.raises(ValueError, match="alpha must be"):
    pmr.pmr(optax.sgd(1.0), num_classes=2, feature_dims=(3, 3), alpha=-1.0)
  with pytest.raises(ValueError, match="momentum must be"):
    pmr.pmr(optax.sgd(1.0), num_classes=2, feature_dims=(3, 3), alpha=1.0, momentum=1.0)
  with pytest.raises(ValueError, match="rule must be one of"):
    pmr.pmr(optax.sgd(1.0), num_classes=2, feature_dims=(3, 3), alpha=1.0, rule="x")
  with pytest.raises(ValueError, match="epochs must be None"):
    pmr.pmr(optax.sgd(1.0), num_classes=2, feature_dims=(3, 3), alpha=1.0, epochs=(3, 1))
  tx = pmr.pmr(optax.sgd(1.0), num_classes=2, feature_dims=(3, 3), alpha=1.0)
  state = tx.init({"w": jnp.zeros(1)})
  with pytest.raises(ValueError, match="needs this step's features"):
    tx.update({"w": jnp.zeros(1)}, state, None)
  with pytest.raises(ValueError, match="epoch hooks need"):
    epochs.epoch_start(state)
  with pytest.raises(ValueError, match="prototype_sums have shapes"):
    epochs.epoch_start(state, prototype_sums=pmr.PrototypeSums(
        (jnp.zeros((2, 4)), jnp.zeros((2, 3))), jnp.ones(2)))
  with pytest.raises(ValueError, match="label must be int"):
    pmr.prototype_sums((jnp.zeros((2, 3)), jnp.zeros((2, 3))), jnp.zeros(2), 2)
  with pytest.raises(ValueError, match="sow them"):
    pmr.sown_features({})


def test_an_nnx_model_gives_its_sown_features_to_the_prototype_pass_and_the_step():
  # NNX sows into nnx.Intermediate: wrap() returned nothing under "intermediates", so an NNX
  # model could not feed PMR (no features for the prototype pass, feature_dims or the step).
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.encoder_0, self.encoder_1 = nnx.Linear(3, 2, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)
      self.head_0, self.head_1 = nnx.Linear(2, 2, rngs=rngs), nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, inputs, *, train, cut=-1, drop=None):
      h = [self.encoder_0(inputs[0]), self.encoder_1(inputs[1])]
      for f in h:
        self.sow(nnx.Intermediate, "features", f)
      branch_logits = jnp.stack([self.head_0(h[0]), self.head_1(h[1])])
      return branch_logits.mean(axis=0), branch_logits

  rng = np.random.default_rng(0)
  batch = {"inputs": (rng.normal(size=(6, 3)).astype(np.float32),
                      rng.normal(size=(6, 4)).astype(np.float32)),
           "label": np.array([0, 1, 0, 1, 1, 1], np.int32)}
  model = Net(nnx.Rngs(0))
  tx = pmr.pmr(optax.sgd(0.1), num_classes=2, feature_dims=(2, 2), alpha=1.0)
  state = gml_jax.create_train_state(model, tx, batch["inputs"])
  assert pmr.feature_dims(model, state.variables, batch["inputs"]) == (2, 2)
  sums = pmr.prototype_pass(jax.jit(pmr.make_prototype_step(model, 2)), state.variables, [batch])
  params = state.params
  for k, x in enumerate(batch["inputs"]):  # class means of x W + b, by hand
    layer = jax.tree.map(np.asarray, params[f"encoder_{k}"])
    f = x @ layer["kernel"] + layer["bias"]
    means = [f[batch["label"] == c].mean(axis=0) for c in (0, 1)]
    np.testing.assert_allclose(sums.sums[k] / np.asarray(sums.counts)[:, None], means, rtol=1e-5)
  state = state.replace(opt_state=epochs.epoch_start(state.opt_state, prototype_sums=sums))
  state, metrics = jax.jit(gml_jax.make_train_step(model, tx))(state, batch)
  assert sorted(np.asarray(metrics["pmr_coefficient"]).tolist()) == [0.0, 1.0]
  assert not hasattr(model, "features")  # captured, not left on the user's module
