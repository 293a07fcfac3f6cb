"""A user's own model (FiLM fusion, not MMTM) in Linen and NNX, through the library: the cut,
the label rules, the steps and the utilization rate, against hand computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gml_jax

WIDTH, CLASSES, DIMS = 6, 3, (5, 4)
LABELS = gml_jax.label_rules([(r"(?:enc|head)_(\d)", r"main:\1"),
                              (r"(?:film|cut)_(\d)", r"fusion:\1")])


class LinenFiLM(nn.Module):
  """Two encoders; each branch is scaled and shifted by a FiLM of the other's features."""

  @nn.compact
  def __call__(self, inputs, *, train, cut=-1, drop=None):
    h = [nn.relu(nn.Dense(WIDTH, name=f"enc_{k}")(x)) for k, x in enumerate(inputs)]
    logits = []
    for k in range(2):
      film = nn.Dense(2 * WIDTH, name=f"film_{k}")(h[1 - k])
      film = gml_jax.CrossModalCut(branch=k, name=f"cut_{k}")(film, train=train, cut=cut,
                                                               drop=drop)
      fused = h[k] * (1 + film[:, :WIDTH]) + film[:, WIDTH:]
      logits.append(nn.Dense(CLASSES, name=f"head_{k}")(fused))
    branch_logits = jnp.stack(logits)
    return branch_logits.mean(0), branch_logits


class NNXFiLM(nnx.Module):
  """The same network in NNX (same module names, so the same variable paths)."""

  def __init__(self, rngs):
    self.enc_0, self.enc_1 = (nnx.Linear(d, WIDTH, rngs=rngs) for d in DIMS)
    self.film_0, self.film_1 = (nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs) for _ in range(2))
    self.cut_0 = gml_jax.nnx.CrossModalCut((2 * WIDTH,), branch=0)
    self.cut_1 = gml_jax.nnx.CrossModalCut((2 * WIDTH,), branch=1)
    self.head_0, self.head_1 = (nnx.Linear(WIDTH, CLASSES, rngs=rngs) for _ in range(2))

  def __call__(self, inputs, *, train, cut=-1, drop=None):
    h = [nnx.relu(self.enc_0(inputs[0])), nnx.relu(self.enc_1(inputs[1]))]
    films, cuts, heads = (self.film_0, self.film_1), (self.cut_0, self.cut_1), (self.head_0,
                                                                                self.head_1)
    logits = []
    for k in range(2):
      film = cuts[k](films[k](h[1 - k]), train=train, cut=cut, drop=drop)
      logits.append(heads[k](h[k] * (1 + film[:, :WIDTH]) + film[:, WIDTH:]))
    branch_logits = jnp.stack(logits)
    return branch_logits.mean(0), branch_logits


def _batch(seed, size=16):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, CLASSES, size)
  xs = tuple(jnp.asarray(rng.normal(size=(size, d)) + (1 - 2 * k) * y[:, None], jnp.float32)
             for k, d in enumerate(DIMS))
  return {"inputs": xs, "label": jnp.asarray(y, jnp.int32)}


def _tx(method="random"):
  return gml_jax.balanced_multimodal(optax.sgd(0.05, momentum=0.9), LABELS, method=method,
                                     seed=3, warmup_steps=2)


def _train(model, state, steps=24):
  step = jax.jit(gml_jax.make_train_step(model, _tx(), LABELS))
  history = []
  for t in range(steps):
    new, metrics = step(state, _batch(t))
    history.append((state, new, int(metrics["target"])))
    state = new
  return state, history


# --------------------------------------------------------------------------------------
# The cut


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_cut_substitutes_the_mean_of_earlier_training_calls(framework):
  signals = [np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[5.0, 0.0], [7.0, 2.0]]),
             np.array([[0.0, 0.0], [0.0, 0.0]])]
  if framework == "linen":
    cut_module = gml_jax.CrossModalCut(branch=1)
    variables = cut_module.init(jax.random.key(0), jnp.zeros((2, 2)), train=False)
    def call(x, *, train, cut):
      nonlocal variables
      out, new = cut_module.apply(variables, jnp.asarray(x, jnp.float32), train=train,
                                  cut=jnp.int32(cut), mutable=["fusion_stats"])
      variables = {**variables, **new}
      return np.asarray(out), variables["fusion_stats"]
  else:
    module = gml_jax.nnx.CrossModalCut((2,), branch=1)
    def call(x, *, train, cut):
      out = module(jnp.asarray(x, jnp.float32), train=train, cut=jnp.int32(cut))
      return np.asarray(out), {"running_mean": module.running_mean.get_value(),
                               "running_count": module.running_count.get_value()}

  out, stats = call(signals[0], train=True, cut=-1)  # normal: passes, mean of batch 0
  np.testing.assert_array_equal(out, signals[0])
  np.testing.assert_allclose(stats["running_mean"], [2.0, 3.0])
  out, stats = call(signals[1], train=True, cut=0)  # another branch cut: this one passes
  np.testing.assert_allclose(stats["running_mean"], [(2 + 6) / 2, (3 + 1) / 2])
  out, stats = call(signals[2], train=True, cut=1)  # cut: the mean of the 2 earlier calls
  np.testing.assert_allclose(out, [[4.0, 2.0], [4.0, 2.0]])
  np.testing.assert_allclose(stats["running_mean"], [4.0, 2.0])  # and it does not move
  assert float(stats["running_count"]) == 2
  out, stats = call(signals[2], train=False, cut=-1)  # evaluation never moves it
  np.testing.assert_allclose(stats["running_mean"], [4.0, 2.0])


def test_frozen_running_means_stay_put_in_rebalancing_steps():
  model = LinenFiLM()
  state = gml_jax.create_train_state(model, _tx(), _batch(0)["inputs"])
  _, history = _train(model, state)
  targets = [t for _, _, t in history]
  assert {-1, 0, 1} <= set(targets)
  for before, after, target in history:
    old, new = before.model_state["fusion_stats"], after.model_state["fusion_stats"]
    for k in range(2):
      same = np.array_equal(old[f"cut_{k}"]["running_mean"], new[f"cut_{k}"]["running_mean"])
      # update="branch": a re-balancing step moves main:target only, every mean stays.
      assert same == (target >= 0), (target, k)


# --------------------------------------------------------------------------------------
# Linen and NNX through the same steps


def test_linen_and_nnx_take_the_same_steps_from_the_same_weights():
  linen_model, nnx_model = LinenFiLM(), NNXFiLM(nnx.Rngs(0))
  linen = gml_jax.create_train_state(linen_model, _tx(), _batch(0)["inputs"], seed=1)
  nnx_state = gml_jax.create_train_state(nnx_model, _tx(), _batch(0)["inputs"])
  assert jax.tree.structure(nnx_state.params) == jax.tree.structure(linen.params)
  assert jax.tree.structure(nnx_state.model_state) == jax.tree.structure(linen.model_state)
  nnx_state = gml_jax.create_train_state(nnx_model, _tx(), _batch(0)["inputs"]).replace(
      params=linen.params, opt_state=_tx().init(linen.params))
  linen_end, linen_history = _train(linen_model, linen)
  nnx_end, nnx_history = _train(nnx_model, nnx_state)
  assert [t for *_, t in linen_history] == [t for *_, t in nnx_history]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               (linen_end.params, linen_end.model_state), (nnx_end.params, nnx_end.model_state))
  # The trained NNX model comes back as an NNX module.
  trained = gml_jax.nnx.wrap(nnx_model).module(nnx_end.variables)
  np.testing.assert_allclose(trained.head_1.kernel.get_value(),
                             linen_end.params["head_1"]["kernel"],
                             rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# The utilization rate by hand


def _numpy_forward(params, xs, films=(None, None)):
  """The FiLM network by hand; ``films[k]`` replaces the FiLM signal into branch k."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  dense = lambda name, x: x @ p[name]["kernel"] + p[name]["bias"]
  h = [np.maximum(dense(f"enc_{k}", np.asarray(x, np.float64)), 0) for k, x in enumerate(xs)]
  logits, signals = [], []
  for k in range(2):
    film = dense(f"film_{k}", h[1 - k])
    signals.append(film)
    if films[k] is not None:
      film = np.broadcast_to(films[k], film.shape)
    logits.append(dense(f"head_{k}", h[k] * (1 + film[:, :WIDTH]) + film[:, WIDTH:]))
  return np.stack(logits), signals


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_conditional_utilization_of_a_film_model_equals_numpy(framework):
  model = LinenFiLM() if framework == "linen" else NNXFiLM(nnx.Rngs(2))
  state = gml_jax.create_train_state(model, _tx(), _batch(0)["inputs"], seed=2)
  state, _ = _train(model, state, steps=10)
  train, test = [_batch(100), _batch(101, 8)], [_batch(200), _batch(201)]
  result = gml_jax.conditional_utilization(model, state.variables, train, test)

  train_x = [np.concatenate([np.asarray(b["inputs"][k]) for b in train]) for k in range(2)]
  _, signals = _numpy_forward(state.params, train_x)
  means = [s.mean(axis=0) for s in signals]
  test_x = [np.concatenate([np.asarray(b["inputs"][k]) for b in test]) for k in range(2)]
  y = np.concatenate([np.asarray(b["label"]) for b in test])
  accuracy = lambda logits: (logits.argmax(-1) == y).mean(-1)
  full, _ = _numpy_forward(state.params, test_x)
  # Dropping m_1 replaces what branch 0 gets from it (the FiLM into 0) by its training mean.
  without_1, _ = _numpy_forward(state.params, test_x, films=(means[0], None))
  without_0, _ = _numpy_forward(state.params, test_x, films=(None, means[1]))
  a = accuracy(full)
  np.testing.assert_allclose(result.branch_accuracy, a)
  np.testing.assert_allclose(result.ablated_accuracy[1, 0], accuracy(without_1)[0])
  np.testing.assert_allclose(result.ablated_accuracy[0, 1], accuracy(without_0)[1])
  np.testing.assert_allclose(result.rates[1, 0], (a[0] - accuracy(without_1)[0]) / a[0])
  np.testing.assert_allclose(result.rates[0, 1], (a[1] - accuracy(without_0)[1]) / a[1])
  np.testing.assert_allclose(result.accuracy, accuracy(full.mean(0)))
  means_tree = gml_jax.training_means(model, state.variables, train)
  np.testing.assert_allclose(means_tree["cut_0"]["train_mean"], means[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Labels


def test_label_rules_give_the_same_labels_for_linen_nnx_and_plain_pytrees():
  linen_params = LinenFiLM().init(jax.random.key(0), _batch(0)["inputs"], train=False)["params"]
  nnx_params = nnx.state(NNXFiLM(nnx.Rngs(0)), nnx.Param)
  plain = {"enc_0": [np.ones(2), np.ones(1)], "head_1": {"w": np.ones(3)}}
  by_path = lambda tree: {gml_jax.path_string(p): label for p, label in
                          jax.tree_util.tree_flatten_with_path(LABELS(tree))[0]}
  linen, nnx_labels = by_path(linen_params), by_path(nnx_params)
  assert linen == nnx_labels
  assert linen["enc_1/kernel"] == "main:1" and linen["film_0/bias"] == "fusion:0"
  assert by_path(plain) == {"enc_0/0": "main:0", "enc_0/1": "main:0", "head_1/w": "main:1"}
  # Every collection of the model, by the same rules.
  stats = by_path(nnx.state(NNXFiLM(nnx.Rngs(0)), gml_jax.nnx.FusionStat))
  assert stats == {"cut_0/running_count": "fusion:0", "cut_0/running_mean": "fusion:0",
                   "cut_1/running_count": "fusion:1", "cut_1/running_mean": "fusion:1"}


def test_an_unassigned_parameter_is_an_error_naming_its_path():
  params = {"enc_0": {"kernel": np.ones(2)}, "extra_layer": {"bias": np.ones(2)}}
  with pytest.raises(ValueError, match=r"No label rule matches 'extra_layer/bias'.*'other'"):
    LABELS(params)
  explicit = gml_jax.label_rules([(r"enc_(\d)", r"main:\1"), ("extra_layer", "other")])
  assert explicit(params)["extra_layer"]["bias"] == "other"
  with pytest.raises(ValueError, match="group_labels knows the layout of gml_jax's FusionNetwork"):
    gml_jax.group_labels({"branches_0": {"k": 1}, "my_layer": {"k": 1}})
  with pytest.raises(ValueError, match="Unknown parameter-group label 'mian:0'"):
    gml_jax.label_rules([("enc", "mian:0")])
  with pytest.raises(ValueError, match=r"Unknown parameter-group label 'main:x'"):
    gml_jax.label_rules([(r"enc_(\w)", r"main:\1")])({"enc_x": 1})


# --------------------------------------------------------------------------------------
# The optimizer chain


def _chain_params():
  rng = np.random.default_rng(0)
  return {name: jnp.asarray(rng.normal(size=3), jnp.float32)
          for name in ("enc_0", "enc_1", "film_0", "film_1")}


def test_check_masking_catches_a_transform_after_the_balancing_one():
  params = _chain_params()
  balanced = lambda inner: gml_jax.balanced_multimodal(inner, LABELS)
  with pytest.raises(ValueError, match=r"'enc_1' \(main:1\) in a step for modality 0.*outermost"):
    gml_jax.check_masking(optax.chain(balanced(optax.sgd(0.1)), optax.add_decayed_weights(0.1)),
                          params, LABELS)
  for safe in (balanced(optax.chain(optax.sgd(0.1), optax.add_decayed_weights(0.1))),
               optax.chain(optax.clip_by_global_norm(1.0), balanced(optax.sgd(0.1))),
               balanced(optax.adamw(1e-3, weight_decay=0.1)),
               gml_jax.balanced_multimodal(optax.adamw(1e-3), LABELS, update="all")):
    assert gml_jax.check_masking(safe, params, LABELS) is None
  with pytest.raises(ValueError, match="Expected one balanced_multimodal state"):
    gml_jax.check_masking(optax.sgd(0.1), params, LABELS)


# --------------------------------------------------------------------------------------
# Messages where there were raw errors


def test_a_model_outside_the_protocol_is_refused_with_what_is_expected():
  class NoTrainFlag(nn.Module):  # the old README's TwoTower: no `train`, positional cut
    @nn.compact
    def __call__(self, audio, video, cut):
      return nn.Dense(3)(audio), nn.Dense(3)(video)

  with pytest.raises(TypeError, match=r"make_train_step calls the model as .*does not take "
                                      r"train and takes 2 positional inputs \(audio, video\)"):
    gml_jax.make_train_step(NoTrainFlag(), _tx(), LABELS)

  class OneOutput(nn.Module):
    @nn.compact
    def __call__(self, inputs, *, train, cut=-1, drop=None):
      return nn.Dense(3)(jnp.concatenate(inputs, -1))

  batch = _batch(0)
  state = gml_jax.create_train_state(OneOutput(), optax.sgd(0.1), batch["inputs"])
  with pytest.raises(ValueError, match=r"must return \(logits \[B, C\], branch_logits"):
    gml_jax.make_train_step(OneOutput(), optax.sgd(0.1))(state, batch)

  class NoCut(nn.Module):  # follows the protocol, but has nothing to drop
    @nn.compact
    def __call__(self, inputs, *, train, cut=-1, drop=None):
      logits = jnp.stack([nn.Dense(3, name=f"head_{k}")(x) for k, x in enumerate(inputs)])
      return logits.mean(0), logits

  variables = NoCut().init(jax.random.key(0), batch["inputs"], train=False)
  with pytest.raises(ValueError, match="no signal to drop.*CrossModalCut"):
    gml_jax.conditional_utilization(NoCut(), variables, [batch], [batch])


def test_shapes_are_checked_with_the_expected_shape():
  logits, labels = jnp.zeros((2, 4, 3)), jnp.zeros(4, jnp.int32)
  np.testing.assert_allclose(gml_jax.true_class_scores(logits, labels), [4 / 3, 4 / 3])
  with pytest.raises(ValueError, match=r"one array \[N, B, C\].*got a list"):
    gml_jax.true_class_scores([logits[0], logits[1]], labels)
  with pytest.raises(ValueError, match=r"\[N, B, C\].*got shape \(4, 6\)"):
    gml_jax.true_class_scores(jnp.zeros((4, 6)), labels)
  with pytest.raises(ValueError, match=r"labels must be int\[B\] with B = 4"):
    gml_jax.true_class_scores(logits, jnp.zeros(5, jnp.int32))
  with pytest.raises(ValueError, match=r"`drop` must be a bool vector \[2\]"):
    gml_jax.MMTM().init(jax.random.key(0), [jnp.ones((2, 3)), jnp.ones((2, 3))], train=False,
                        drop=jnp.zeros((2, 2), bool))
  with pytest.raises(ValueError, match=r"expected \[B, 12\]"):
    gml_jax.nnx.CrossModalCut((12,), branch=0)(jnp.ones((2, 5)), train=False)


def test_keep_frozen_takes_the_mode_read_before_the_update():
  params = _chain_params()
  tx = gml_jax.balanced_multimodal(optax.sgd(0.1), LABELS)
  opt_state = tx.init(params)
  with pytest.raises(TypeError, match=r"step_mode\(opt_state\) before tx.update"):
    gml_jax.keep_frozen(opt_state, LABELS, params, params)
  forced = opt_state._replace(target=jnp.int32(1))
  mode = gml_jax.step_mode(forced)
  new = jax.tree.map(lambda x: x + 1, params)
  kept = gml_jax.keep_frozen(mode, LABELS, new, params)
  assert [bool(jnp.all(kept[k] == new[k])) for k in sorted(params)] == [False, True, False, False]


def test_undefined_and_untrustworthy_speeds_are_reported():
  params = {"enc_0": jnp.ones(3), "enc_1": jnp.ones(3), "film_0": jnp.zeros(3),
            "film_1": jnp.ones(3)}
  tx = gml_jax.balanced_multimodal(optax.sgd(0.1), LABELS)
  state = tx.init(params)
  assert np.all(np.isnan(gml_jax.modality_speeds(state)))  # nothing accumulated: undefined
  assert gml_jax.speed_warnings(state) == ["No step taken yet: the speeds are undefined."]
  grads = {"enc_0": jnp.ones(3), "enc_1": jnp.ones(3), "film_0": jnp.zeros(3),
           "film_1": jnp.ones(3)}
  _, state = tx.update(grads, state, params)
  speeds = np.asarray(gml_jax.modality_speeds(state))
  assert np.isnan(speeds[0]) and speeds[1] == 0.0
  assert int(gml_jax.rebalance_target(state)) == -1  # an undefined d_speed starts nothing
  warnings = gml_jax.speed_warnings(state)
  assert any("fusion:0 has ‖θ‖² = 0" in w and "zero-initialised" in w for w in warnings)
  assert any("s_0 is undefined" in w for w in warnings)


# --------------------------------------------------------------------------------------
# A hand-written step with BatchNorm, Linen and NNX; silent pitfalls made loud (issue 36)

BN_LABELS = gml_jax.label_rules([(r"(?:enc|bn|head)_(\d)", r"main:\1"),
                                 (r"(?:film|cut)_(\d)", r"fusion:\1")])


class NNXBatchNormFiLM(NNXFiLM):
  """NNXFiLM with a BatchNorm after each encoder."""

  def __init__(self, rngs):
    super().__init__(rngs)
    self.bn_0, self.bn_1 = (nnx.BatchNorm(WIDTH, rngs=rngs) for _ in range(2))

  def __call__(self, inputs, *, train, cut=-1, drop=None):
    h = [nnx.relu(bn(enc(x), use_running_average=not train)) for enc, bn, x in
         zip((self.enc_0, self.enc_1), (self.bn_0, self.bn_1), inputs)]
    films, cuts, heads = (self.film_0, self.film_1), (self.cut_0, self.cut_1), (self.head_0,
                                                                                self.head_1)
    logits = [heads[k](h[k] * (1 + film[:, :WIDTH]) + film[:, WIDTH:]) for k, film in
              ((k, cuts[k](films[k](h[1 - k]), train=train, cut=cut, drop=drop)) for k in (0, 1))]
    branch_logits = jnp.stack(logits)
    return branch_logits.mean(0), branch_logits


def _fixed_tx():  # step 0 normal, steps 1-2 re-balance modality 1, step 3 normal, ...
  return gml_jax.balanced_multimodal(optax.sgd(0.05, momentum=0.9), BN_LABELS, method="fixed",
                                     target=1, window=2)


def test_nnx_keep_frozen_refuses_live_state_and_the_recipe_equals_the_library_step():
  batch = _batch(0)
  model = NNXBatchNormFiLM(nnx.Rngs(0))
  # The silent behaviour: nnx.state() holds live variables; read before the forward pass,
  # it holds the new statistics after it, so keep_frozen compared a state with itself.
  live, snapshot = nnx.state(model, nnx.BatchStat), gml_jax.nnx.stats(model, nnx.BatchStat)
  model.bn_0(jnp.ones((4, WIDTH)))  # what the forward pass does to branch 0's statistics
  assert not np.allclose(nnx.to_pure_dict(live)["bn_0"]["mean"], snapshot["bn_0"]["mean"])
  mode = gml_jax.StepMode(jnp.int32(1), jnp.asarray(False))
  with pytest.raises(ValueError, match=r"same live variables.*gml_jax.nnx.stats\(model\).*"
                                       r"gml_jax.nnx.keep_frozen\(mode, labels, model, old\)"):
    gml_jax.keep_frozen(mode, BN_LABELS, nnx.state(model, nnx.BatchStat), live)

  # The recipe of docs/tutorials/n_modalities.md and gml_jax.nnx's docstring.
  model = NNXBatchNormFiLM(nnx.Rngs(0))
  library = gml_jax.create_train_state(NNXBatchNormFiLM(nnx.Rngs(0)), _fixed_tx(),
                                       batch["inputs"])
  library_step = jax.jit(gml_jax.make_train_step(NNXBatchNormFiLM(nnx.Rngs(0)), _fixed_tx(),
                                                 BN_LABELS))
  optimizer = nnx.Optimizer(model, _fixed_tx(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    mode = gml_jax.step_mode(optimizer.opt_state)  # before the update
    before = gml_jax.nnx.stats(model)  # a copy, before the forward pass

    def loss_fn(model):
      _, branch_logits = model(batch["inputs"], train=True, cut=mode.target)
      ce = jax.vmap(optax.softmax_cross_entropy_with_integer_labels, (0, None))
      return jnp.sum(jnp.mean(ce(branch_logits, batch["label"]), axis=-1))

    optimizer.update(model, nnx.grad(loss_fn)(model))
    gml_jax.nnx.keep_frozen(mode, BN_LABELS, model, before)

  for t in range(4):
    target = int(gml_jax.rebalance_target(optimizer.opt_state))
    assert target == (1 if t in (1, 2) else -1)
    before = gml_jax.nnx.stats(model)
    step(model, optimizer, _batch(t))
    library, _ = library_step(library, _batch(t))
    after = gml_jax.nnx.stats(model)
    for path, old, new in zip(*(jax.tree_util.tree_flatten_with_path(s)[0]
                                for s in (before, before, after))):
      name = gml_jax.path_string(path[0])
      frozen = target == 1 and not name.startswith(("bn_1", "cut_1"))
      assert np.array_equal(old[1], new[1]) == frozen or "cut_1" in name, (t, name)
    mine = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)), **{
        c: v for c, v in (("batch_stats", nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))),
                          ("fusion_stats", nnx.to_pure_dict(
                              nnx.state(model, gml_jax.nnx.FusionStat))))}}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 mine, library.variables)


def test_linen_keep_frozen_takes_the_dict_that_mutable_returns():
  batch = _batch(0)
  model = LinenFiLM()
  variables = model.init(jax.random.key(0), batch["inputs"], train=False)
  stats = {"fusion_stats": variables["fusion_stats"]}
  _, new_stats = model.apply(variables, batch["inputs"], train=True, cut=-1,
                             mutable=["fusion_stats"])
  mode = gml_jax.StepMode(jnp.int32(0), jnp.asarray(False))
  kept = gml_jax.keep_frozen(mode, LABELS, new_stats, stats)  # a label error before
  by_collection = gml_jax.keep_frozen(mode, LABELS, new_stats["fusion_stats"],
                                      stats["fusion_stats"])
  jax.tree.map(np.testing.assert_array_equal, kept["fusion_stats"], by_collection)
  # cut_0 feeds branch 0 (fusion:0, frozen in a step for 0); cut_1 is fusion:1, frozen too
  # under update="branch": both keep their old running means.
  jax.tree.map(np.testing.assert_array_equal, kept, stats)
  with pytest.raises(ValueError, match=r"No label rule matches 'extra'"):
    gml_jax.keep_frozen(mode, LABELS, {"fusion_stats": {"extra": jnp.ones(2)}},
                        {"fusion_stats": {"extra": jnp.ones(2)}})


class NNXFiLMWithoutCut(NNXFiLM):
  """A model for the utilization rate only: its call takes no `cut`."""

  def __call__(self, inputs, *, train, drop=None):
    return super().__call__(inputs, train=train, drop=drop)


def test_conditional_utilization_of_an_nnx_model_without_cut():
  batches = [_batch(s) for s in range(2)]
  with_cut, without = NNXFiLM(nnx.Rngs(1)), NNXFiLMWithoutCut(nnx.Rngs(1))
  variables = gml_jax.nnx.wrap(with_cut).init()
  expected = gml_jax.conditional_utilization(with_cut, variables, batches, batches)
  got = gml_jax.conditional_utilization(without, variables, batches, batches)  # a TypeError before
  np.testing.assert_array_equal(got.rates, expected.rates)
  with pytest.raises(TypeError, match=r"does not take cut"):
    gml_jax.make_train_step(without, _tx(), LABELS)


def test_replicate_copies_so_a_donating_step_leaves_the_given_state_usable():
  state = {"w": jnp.arange(8.0), "step": jnp.zeros((), jnp.int32)}
  mesh = gml_jax.data_mesh()  # 8 devices (tests/conftest.py)
  step = gml_jax.compile_train_step(
      lambda s, batch: (jax.tree.map(lambda x: x + 1, s), {"x": jnp.sum(batch["x"])}), mesh)
  batch = gml_jax.shard_batch({"x": jnp.ones(8)}, mesh)
  replicated = gml_jax.replicate(state, mesh)
  new, _ = step(replicated, batch)
  assert all(x.is_deleted() for x in jax.tree.leaves(replicated))  # donated, as documented
  assert not any(x.is_deleted() for x in jax.tree.leaves(state))  # deleted before the copy
  np.testing.assert_array_equal(state["w"], np.arange(8.0))
  np.testing.assert_array_equal(new["w"], np.arange(8.0) + 1)


def test_set_hyperparams_sets_an_nnx_optimizer_rate_in_place():
  model = NNXFiLM(nnx.Rngs(0))
  tx = gml_jax.balanced_multimodal(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                                   LABELS, method="vanilla")
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  gml_jax.set_hyperparams(optimizer.opt_state, learning_rate=0.025)
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  update = nnx.jit(lambda m, o: o.update(m, jax.tree.map(jnp.ones_like, nnx.state(m, nnx.Param))))
  update(model, optimizer)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a - b, -0.025, atol=1e-6), after, before)
