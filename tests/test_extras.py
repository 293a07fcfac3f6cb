"""The step protocol (gml_jax.extras): a transform's state declares what its update needs
and what it reports; the library's step computes exactly that, checked by hand in NumPy on
a tiny two-branch model."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gml_jax
from gml_jax import extras
from gml_jax.steps import create_train_state, make_train_step

CLASSES, B = 3, 4


class Tiny(nn.Module):
  """Two linear branches; branch 0 gets a projection of branch 1's features through a cut;
  each branch's features are sown; ŷ is the mean of the branch logits."""

  @nn.compact
  def __call__(self, inputs, *, train, cut=-1, drop=None):
    x0, x1 = inputs
    h0 = nn.Dense(3, use_bias=False, name="enc_0")(x0)
    h1 = nn.Dense(3, use_bias=False, name="enc_1")(x1)
    signal = nn.Dense(3, use_bias=False, name="proj_1_0")(h1)
    h0 = h0 + gml_jax.CrossModalCut(branch=0, name="cut_0")(signal, train=train, cut=cut,
                                                              drop=drop)
    self.sow("intermediates", "features", h0)
    self.sow("intermediates", "features", h1)
    z = jnp.stack([nn.Dense(CLASSES, use_bias=False, name="head_0")(h0),
                   nn.Dense(CLASSES, use_bias=False, name="head_1")(h1)])
    return jnp.mean(z, axis=0), z


class ProbeState(NamedTuple):
  """Records what the step hands its update; reports one declared metric."""

  NEEDS = ("scores", "value", "loss_grads", "mono_logits", "features")
  METRICS = {"probe_value": "probe_value"}
  value: jax.Array

  def train_metrics(self):
    return {"probe_value": self.value}


def probe(seen: list, needs=ProbeState.NEEDS):
  state_type = type("Probe", (ProbeState,), {"NEEDS": needs})

  def update(updates, state, params=None, **extra):
    seen.append(extra)
    return jax.tree.map(jnp.zeros_like, updates), state_type(jnp.asarray(1.5))

  return optax.GradientTransformationExtraArgs(lambda p: state_type(jnp.zeros(())), update)


def _batch():
  rng = np.random.default_rng(0)
  return {"inputs": (rng.normal(size=(B, 2)).astype(np.float32),
                     rng.normal(size=(B, 2)).astype(np.float32)),
          "label": np.array([0, 1, 2, 1], np.int32)}


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_the_step_hands_each_need_computed_as_by_hand():
  batch, seen = _batch(), []
  tx = optax.chain(probe(seen), optax.sgd(0.1))
  state = create_train_state(Tiny(), tx, batch["inputs"])
  state, metrics = make_train_step(Tiny(), tx)(state, batch)  # eager: concrete values
  (extra,) = seen
  assert sorted(extra) == sorted(ProbeState.NEEDS) and float(metrics["probe_value"]) == 1.5

  p = jax.tree.map(np.asarray, state.params)
  w = {k: p[k]["kernel"] for k in p}
  x0, x1 = batch["inputs"]
  y = np.eye(CLASSES)[batch["label"]]
  h1 = x1 @ w["enc_1"]
  h0 = x0 @ w["enc_0"] + h1 @ w["proj_1_0"]  # a normal step: the signal passes the cut
  z = np.stack([h0 @ w["head_0"], h1 @ w["head_1"]])
  probs = _softmax(z)
  np.testing.assert_allclose(extra["scores"], (probs * y).sum(-1).sum(-1), rtol=1e-5)
  ce = -(np.log(probs) * y).sum(-1).mean(-1)
  np.testing.assert_allclose(extra["value"], ce.sum(), rtol=1e-5)
  np.testing.assert_allclose(extra["features"][0], h0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(extra["features"][1], h1, rtol=1e-5, atol=1e-6)

  # loss_grads: [0] the fused CE's, [1 + k] branch k's, here for the heads by hand:
  # d CE(softmax(a W)) / dW = a^T (p - y) / B, and ŷ = (z_0 + z_1) / 2 halves it.
  grads = extra["loss_grads"]
  fused = _softmax(z.mean(0)) - y
  for k, a in enumerate((h0, h1)):
    head = grads[f"head_{k}"]["kernel"]
    assert head.shape == (3, 3, CLASSES)
    np.testing.assert_allclose(head[0], a.T @ fused / B / 2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head[1 + k], a.T @ (probs[k] - y) / B, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head[2 - k], 0, atol=1e-7)  # the other branch's loss
  # branch 1's encoder feeds branch 0 through the projection: both losses reach it
  assert np.abs(grads["enc_1"]["kernel"][1]).max() > 1e-4
  assert np.abs(grads["enc_0"]["kernel"][2]).max() == 0  # branch 1's loss never sees enc_0

  # mono_logits: branch k alone: its cross-modal signal is the cut's running mean (zero
  # before the first training call updated it), in evaluation mode.
  mono = np.stack([(x0 @ w["enc_0"]) @ w["head_0"], h1 @ w["head_1"]])
  np.testing.assert_allclose(extra["mono_logits"], mono, rtol=1e-4, atol=1e-6)


def test_a_plain_optimizer_is_handed_nothing_and_pays_nothing():
  batch = _batch()
  tx = optax.sgd(0.1)
  state = create_train_state(Tiny(), tx, batch["inputs"])
  assert extras.needs_of(state.opt_state) == ()
  dots = lambda tx: str(jax.make_jaxpr(make_train_step(Tiny(), tx))(
      create_train_state(Tiny(), tx, batch["inputs"]), batch)).count("dot_general")
  plain, with_grads = dots(tx), dots(optax.chain(probe([], ("loss_grads",)), tx))
  assert with_grads > plain  # the per-loss backward passes exist only when asked for


def test_needs_are_read_from_states_anywhere_in_the_optimizer():
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  labels = {"a": "main:0", "b": "main:1"}
  ogm = gml_jax.ogm_ge(optax.sgd(0.1), labels, alpha=0.5)
  assert extras.needs_of(ogm.init(params)) == ("scores",)
  wrapped = optax.MultiSteps(optax.chain(ogm, optax.contrib.reduce_on_plateau()), 2)
  assert extras.needs_of(wrapped.init(params)) == ("scores", "value")
  assert extras.metric_keys(ogm.init(params)) == {"ogm_ratio": "ogm_ratio_{m}",
                                                   "ogm_coefficient": "ogm_coefficient_{m}"}
  bad = probe([], ("scores", "gradients_of_everything"))
  with pytest.raises(ValueError, match=r"Probe.NEEDS names \['gradients_of_everything'\]"):
    extras.needs_of(bad.init(params))


def test_a_metric_that_no_state_declares_fails_at_the_first_trace():
  class Loud(ProbeState):
    def train_metrics(self):
      return {"probe_value": self.value, "surprise": self.value}

  batch = _batch()
  tx = optax.chain(optax.GradientTransformationExtraArgs(
      lambda p: Loud(jnp.zeros(())), lambda u, s, p=None, **e: (u, s)), optax.sgd(0.1))
  state = create_train_state(Tiny(), tx, batch["inputs"])
  with pytest.raises(ValueError, match=r"Loud.train_metrics\(\) returns \['surprise'\], which "
                                       r"its METRICS \(\['probe_value'\]\) does not declare"):
    jax.jit(make_train_step(Tiny(), tx))(state, batch)


def test_features_must_be_sown_once_per_branch():
  class Quiet(Tiny):
    def sow(self, *args, **kwargs):  # sows nothing
      return False

  batch = _batch()
  tx = optax.chain(probe([], ("features",)), optax.sgd(0.1))
  state = create_train_state(Quiet(), tx, batch["inputs"])
  with pytest.raises(ValueError, match=r"the model sowed 0 'features'.*expected one per "
                                       r"branch \(2\)"):
    make_train_step(Quiet(), tx)(state, batch)


def test_label_and_mono_losses_by_hand():
  """``label`` is the batch's labels; ``mono_losses`` the Shapley combination of the fused
  logits of each non-empty subset (others' inputs zeros), computed here by hand for a
  linear model whose fused logits are x_0 A + x_1 B + x_0 x_1 (interaction) + b."""
  from gml_jax.extras import COMPUTE, StepPass

  rng = np.random.default_rng(3)
  a, b, bias = rng.normal(size=(2, 3)), rng.normal(size=(2, 3)), rng.normal(size=3)
  x0, x1 = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
  labels = np.array([0, 2, 1, 2], np.int32)

  def fused(inputs):
    u, v = inputs
    return u @ a + v @ b + (u * v).sum(-1, keepdims=True) + bias

  step = StepPass(outputs=None, logits=None, branch_logits=jnp.zeros((2, 4, 3)),
                  labels=jnp.asarray(labels), value=None,
                  inputs=(jnp.asarray(x0), jnp.asarray(x1)),
                  evaluate_on=lambda inputs: (fused(inputs), None))
  np.testing.assert_array_equal(COMPUTE["label"](None, step), labels)
  v0, v1, v01 = (np.asarray(fused(i)) for i in ((x0, 0 * x1), (0 * x0, x1), (x0, x1)))
  phi = [(v0 + v01 - v1) / 2, (v1 + v01 - v0) / 2]  # Shapley, v(∅) = 0
  def ce(z):
    z = z - z.max(-1, keepdims=True)
    return -(z[np.arange(4), labels] - np.log(np.exp(z).sum(-1))).mean()
  np.testing.assert_allclose(COMPUTE["mono_losses"](None, step), [ce(p) for p in phi],
                             rtol=1e-5)


class _Term(NamedTuple):
  """A state whose loss term is w · Σ_i f_i (features of one branch) + the label count."""

  w: jax.Array
  LOSS_NEEDS = ("features", "label")
  NEEDS = ()

  def loss_term(self, *, features, label):
    return self.w * jnp.sum(features[0]) + jnp.sum(label)


def test_loss_terms_sum_every_declaring_state_and_name_what_is_missing():
  from gml_jax.extras import loss_needs_of, loss_terms

  state = (optax.EmptyState(), _Term(jnp.float32(2.0)), (_Term(jnp.float32(0.5)),))
  assert loss_needs_of(state) == ("features", "label")
  assert loss_needs_of(optax.sgd(1.0).init({"w": jnp.zeros(1)})) == ()
  feats = (jnp.array([[1.0, 2.0]]),)
  np.testing.assert_allclose(loss_terms(state, features=feats, label=jnp.array([3])),
                             2.0 * 3 + 3 + 0.5 * 3 + 3)
  with pytest.raises(ValueError, match=r"_Term needs \['label'\]"):
    loss_terms(state, features=feats)


def test_loss_both_is_the_fused_plus_the_branches_losses():
  from gml_jax.steps import training_loss

  logits = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  labels = jnp.array([0, 0])
  p = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum(), np.exp([0.0, 2.0]) / np.exp([0, 2.0]).sum()
  fused = -(np.log(p[0][0]) + np.log(p[1][0])) / 2
  np.testing.assert_allclose(training_loss("both", logits, jnp.array([0.25, 0.5]), labels),
                             fused + 0.75, rtol=1e-6)


class PassState(NamedTuple):
  """A transform state that needs nothing and reports nothing."""

  NEEDS = ()
  METRICS = {}


class LossGradsState(NamedTuple):
  NEEDS = ("loss_grads",)
  METRICS = {}


@pytest.mark.parametrize("loss", ["branches", "fused", "both"])
def test_a_step_asked_for_loss_grads_takes_its_gradient_from_them(loss):
  # With loss_grads needed, the step's gradient is the sum of the per-loss gradients that
  # its loss minimises (one forward pass, N + 1 backward passes): it equals a plain step's.
  batch, seen = _batch(), []

  def recorder(state_type):
    def update(updates, state, params=None, **extra):
      seen.append((updates, extra))
      return updates, state

    return optax.GradientTransformationExtraArgs(lambda p: state_type(), update)

  results = []
  for state_type in (PassState, LossGradsState):
    tx = optax.chain(recorder(state_type), optax.sgd(0.1))
    state = create_train_state(Tiny(), tx, batch["inputs"])
    results.append(make_train_step(Tiny(), tx, loss=loss)(state, batch))
  (plain_grads, _), (grads, extra) = seen
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jax.tree.map(chex_close, grads, plain_grads)
  weights = {"branches": [0, 1, 1], "fused": [1, 0, 0], "both": [1, 1, 1]}[loss]
  jax.tree.map(lambda g, per_loss: chex_close(g, np.tensordot(weights, per_loss, axes=1)),
               grads, extra["loss_grads"])
  (plain_state, plain_metrics), (state, metrics) = results
  jax.tree.map(chex_close, state.params, plain_state.params)
  for key in ("loss", "branch_loss", "accuracy", "branch_accuracy"):
    chex_close(metrics[key], plain_metrics[key])
