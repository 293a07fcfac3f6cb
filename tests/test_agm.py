"""AGM (gml_jax.agm) against NumPy computations written out by hand: Shapley values of a tiny
model (by averaging marginal contributions over orderings), clamped losses, ratios, running
means and coefficients, step by step."""

import doctest
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gml_jax
import gml_jax.nnx
from gml_jax import agm as agm_lib

# --------------------------------------------------------------------------------------
# Shapley mono-modal outputs of a tiny model


class TinyModel(nn.Module):
  """ŷ = Σ_k (x_k W_k + b_k) + Σ_{j<k} (x_j ⊙ x_k) U_jk: per-modality terms plus pairwise
  interactions, so that the Shapley values split the interactions. Follows the protocol."""

  n: int
  classes: int = 3

  @nn.compact
  def __call__(self, inputs, *, train, cut=-1, drop=None):
    branch = jnp.stack([nn.Dense(self.classes, name=f"enc_{k}")(x) for k, x in enumerate(inputs)])
    logits = jnp.sum(branch, axis=0)
    for j, k in itertools.combinations(range(self.n), 2):
      logits = logits + nn.Dense(self.classes, use_bias=False, name=f"pair_{j}{k}")(
          inputs[j] * inputs[k])
    return logits, branch


def _tiny(n, batch=4, features=2, seed=0):
  rng = np.random.default_rng(seed)
  inputs = tuple(jnp.asarray(rng.normal(size=(batch, features)), jnp.float32) for _ in range(n))
  model = TinyModel(n)
  variables = model.init(jax.random.key(seed), inputs, train=False)
  # Non-zero biases, so that a zero input still emits something.
  variables = jax.tree.map(lambda v: v + 0.3, variables)
  return model, variables, inputs


def _np_value(variables, inputs, present):
  """v(S) by hand: the fused logits with the absent modalities' inputs set to zero; v(∅) = 0
  (the authors' convention, so that the values add up to ŷ)."""
  if not any(present):
    return 0.0
  p = jax.tree.map(np.asarray, variables["params"])
  xs = [np.asarray(x) if s else np.zeros_like(np.asarray(x)) for x, s in zip(inputs, present)]
  out = sum(x @ p[f"enc_{k}"]["kernel"] + p[f"enc_{k}"]["bias"] for k, x in enumerate(xs))
  for j, k in itertools.combinations(range(len(xs)), 2):
    out = out + (xs[j] * xs[k]) @ p[f"pair_{j}{k}"]["kernel"]
  return out


def _np_shapley(variables, inputs):
  """φ_m as the average over all orderings of the modalities of m's marginal contribution
  v(predecessors ∪ {m}) - v(predecessors): the definition, not the subset formula."""
  n = len(inputs)
  phi = [0.0] * n
  orders = list(itertools.permutations(range(n)))
  for order in orders:
    present = [False] * n
    for m in order:
      before = _np_value(variables, inputs, present)
      present[m] = True
      phi[m] = phi[m] + (_np_value(variables, inputs, present) - before) / len(orders)
  return np.stack(phi)


def test_shapley_matrix_two_and_three_modalities_by_hand():
  # Two modalities (subsets {0}, {1}, {0,1}): φ_0 = (v0 + v01 - v1) / 2, as the authors.
  np.testing.assert_allclose(agm_lib.shapley_matrix(2), [[0.5, -0.5, 0.5], [-0.5, 0.5, 0.5]])
  # Three: the authors' φ_A = (AVT - VT)/3 + (AV - V + AT - T)/6 + A/3, subsets in the
  # order A, V, AV, T, AT, VT, AVT.
  np.testing.assert_allclose(agm_lib.shapley_matrix(3)[0],
                             [1 / 3, -1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 3, 1 / 3])
  for n in (2, 3, 4):  # efficiency: the values add up to v(M), the last subset
    total = agm_lib.shapley_matrix(n).sum(axis=0)
    np.testing.assert_allclose(total, np.eye(2 ** n - 1)[-1], atol=1e-12)


@pytest.mark.parametrize("n", [2, 3])
def test_mono_modal_outputs_are_the_shapley_values_of_a_tiny_model(n):
  model, variables, inputs = _tiny(n)
  phi = agm_lib.mono_modal_outputs(model, variables, inputs)
  expected = _np_shapley(variables, inputs)
  np.testing.assert_allclose(phi, expected, rtol=1e-5, atol=1e-5)
  fused, _ = model.apply(variables, inputs, train=False)
  np.testing.assert_allclose(phi.sum(axis=0), fused, rtol=1e-5, atol=1e-5)
  if n == 2:  # and the closed form: φ_0 = x_0 W_0 + (b_0 + b_1)/2 + (x_0 ⊙ x_1) U / 2
    p = jax.tree.map(np.asarray, variables["params"])
    x0, x1 = (np.asarray(x) for x in inputs)
    closed = (x0 @ p["enc_0"]["kernel"] + (p["enc_0"]["bias"] + p["enc_1"]["bias"]) / 2
              + (x0 * x1) @ p["pair_01"]["kernel"] / 2)
    np.testing.assert_allclose(phi[0], closed, rtol=1e-5, atol=1e-5)


def test_mono_modal_losses_clamp_a_hopeless_probability():
  logits = jnp.array([[[2.0, 0.0, 0.0], [0.0, 40.0, 0.0]],
                      [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])  # [N=2, B=2, C=3]
  labels = jnp.array([0, 0])
  got = agm_lib.clamped_cross_entropy(logits, labels)
  by_hand = np.array([[-math.log(math.exp(2) / (math.exp(2) + 2)), -math.log(1e-8)],
                      [-math.log(1 / (2 + math.e)), math.log(3)]])
  np.testing.assert_allclose(got, by_hand, rtol=1e-5)
  model, variables, inputs = _tiny(2)
  labels = jnp.array([0, 1, 2, 0])
  phi = _np_shapley(variables, inputs)
  log_p = phi - np.log(np.exp(phi).sum(-1, keepdims=True))
  expected = np.mean(np.minimum(-log_p[:, np.arange(4), labels], -math.log(1e-8)), axis=-1)
  np.testing.assert_allclose(agm_lib.mono_modal_losses(model, variables, inputs, labels),
                             expected, rtol=1e-5)


# --------------------------------------------------------------------------------------
# The rule, step by step


def _np_run(loss_sequence, alpha, cap=10.0):
  """The authors' loop by hand: ratio from this batch's losses, target from the running means
  of the earlier batches (0 before the first), coefficient, then the running mean."""
  n = len(loss_sequence[0])
  running = np.zeros(n)
  out = []
  for t, s in enumerate(loss_sequence, start=1):
    s = np.asarray(s, np.float64)
    ratio = np.exp(n / (n - 1) * (s.mean() - s))
    target = np.exp(n / (n - 1) * (running.mean() - running))
    gap = target - ratio
    coefficient = np.exp(alpha * (np.minimum(gap, cap) if cap is not None else gap))
    running = running * (t - 1) / t + s / t
    out.append((ratio, target, coefficient, running.copy()))
  return out


_COMPILED = {}


def _jit(tx):
  """tx.update compiled once per transform (one program is faster than op-by-op dispatch)."""
  if id(tx) not in _COMPILED:
    _COMPILED[id(tx)] = (tx, jax.jit(
        lambda g, s, p, mono_losses: tx.update(g, s, p, mono_losses=mono_losses)))
  return _COMPILED[id(tx)][1]


def _tree(n, seed=0):
  rng = np.random.default_rng(seed)
  names = [f"b{k}" for k in range(n)] + ["head"]
  labels = {f"b{k}": f"main:{k}" for k in range(n)} | {"head": "other"}
  params = {name: jnp.asarray(rng.normal(size=(2, 3)), jnp.float32) for name in names}
  params |= {f"bias{k}": jnp.asarray(rng.normal(size=3), jnp.float32) for k in range(n)}
  labels |= {f"bias{k}": f"main:{k}" for k in range(n)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  return params, grads, labels


@pytest.mark.parametrize("n,alpha,losses", [
    (2, 1.5, [[0.4, 1.2], [0.9, 0.7], [0.3, 2.0]]),
    (3, 4.0, [[0.5, 1.0, 2.0], [1.1, 0.2, 0.9], [0.6, 0.6, 0.3]]),
])
def test_update_follows_the_hand_written_loop(n, alpha, losses):
  params, grads, labels = _tree(n)
  tx = agm_lib.agm(optax.sgd(1.0), labels, alpha=alpha)
  state = tx.init(params)
  for s, (ratio, target, coefficient, running) in zip(losses, _np_run(losses, alpha)):
    updates, state = _jit(tx)(grads, state, params, mono_losses=jnp.asarray(s))
    np.testing.assert_allclose(state.ratios, ratio, rtol=1e-5)
    np.testing.assert_allclose(state.target_ratios, target, rtol=1e-5)
    np.testing.assert_allclose(state.coefficients, coefficient, rtol=1e-5)
    np.testing.assert_allclose(state.mean_losses, running, rtol=1e-5)
    np.testing.assert_allclose(state.losses, s, rtol=1e-6)
    for k in range(n):  # scope "branch": kernels and biases of branch k
      for name in (f"b{k}", f"bias{k}"):
        np.testing.assert_allclose(updates[name], -coefficient[k] * np.asarray(grads[name]),
                                   rtol=1e-5)
    np.testing.assert_allclose(updates["head"], -np.asarray(grads["head"]), rtol=1e-6)
  assert int(state.step) == len(losses)
  assert set(state.train_metrics()) == set(agm_lib.AGMState.METRICS)
  assert agm_lib.AGMState.NEEDS == ("mono_losses",)


def test_equal_losses_leave_the_gradients_alone():
  params, grads, labels = _tree(3)
  tx = agm_lib.agm(optax.sgd(1.0), labels, alpha=2.0)
  state = tx.init(params)
  for _ in range(2):  # r = 1 = r̄ at every step
    updates, state = _jit(tx)(grads, state, params, mono_losses=jnp.full(3, 0.7))
    np.testing.assert_allclose(state.coefficients, 1.0, rtol=1e-6)
    np.testing.assert_allclose(state.mean_losses, 0.7, rtol=1e-6)
  for name in grads:
    np.testing.assert_allclose(updates[name], -np.asarray(grads[name]), rtol=1e-6)


def test_a_modality_without_gradient_and_the_kernels_scope():
  params, grads, labels = _tree(2)
  grads = grads | {"b1": jnp.zeros_like(grads["b1"]), "bias1": jnp.zeros_like(grads["bias1"])}
  tx = agm_lib.agm(optax.sgd(1.0), labels, alpha=1.0, scope="kernels")
  state = tx.init(params)
  updates, state = _jit(tx)(grads, state, params, mono_losses=jnp.array([0.2, 1.0]))
  coefficient = np.exp(1 - np.exp([0.8, -0.8]))  # r = exp(±(s_1 - s_0)), r̄ = 1
  np.testing.assert_allclose(state.coefficients, coefficient, rtol=1e-5)
  np.testing.assert_allclose(updates["b0"], -coefficient[0] * np.asarray(grads["b0"]), rtol=1e-5)
  np.testing.assert_allclose(updates["bias0"], -np.asarray(grads["bias0"]), rtol=1e-6)  # rank 1
  np.testing.assert_array_equal(updates["b1"], 0.0)
  np.testing.assert_array_equal(updates["bias1"], 0.0)


def test_window_cap_and_head_guard():
  params, grads, labels = _tree(2)
  losses = [[0.1, 9.0], [0.5, 0.6], [5.0, 0.1]]
  tx = agm_lib.agm(optax.sgd(1.0), labels, alpha=0.5, window=(1, 3), cap=2.0)
  state = tx.init(params)
  expected = _np_run(losses, 0.5, cap=2.0)
  assert expected[0][2][0] < 1e-6  # update 0 would all but stop modality 0 ...
  for t, s in enumerate(losses):
    updates, state = _jit(tx)(grads, state, params, mono_losses=jnp.asarray(s))
    want = expected[t][2] if t >= 1 else np.ones(2)  # ... but is outside the window
    np.testing.assert_allclose(state.coefficients, want, rtol=1e-5)
    np.testing.assert_allclose(state.mean_losses, expected[t][3], rtol=1e-5)  # always kept
    if t == 1:  # r̄_0 - r_0 = e^8.9 - e^0.1 is capped at 2; modality 1 is not
      np.testing.assert_allclose(state.coefficients,
                                 [np.e, np.exp(0.5 * (np.exp(-8.9) - np.exp(-0.1)))], rtol=1e-5)

  # The guard: the head's largest entry over `clip` rescales everything to global norm clip.
  big = grads | {"head": grads["head"].at[0, 0].set(50.0)}
  tx = agm_lib.agm(optax.sgd(1.0), labels, alpha=1.0, clip=1.0)
  state = tx.init(params)
  updates, _ = _jit(tx)(big, state, params, mono_losses=jnp.array([0.5, 0.5]))
  norm = np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(big)))
  for name in big:
    np.testing.assert_allclose(updates[name], -np.asarray(big[name]) / norm, rtol=1e-5)
  small = jax.tree.map(lambda g: g * 0.01, grads)  # head under the threshold: untouched
  updates, _ = _jit(tx)(small, state, params, mono_losses=jnp.array([0.5, 0.5]))
  for name in small:
    np.testing.assert_allclose(updates[name], -np.asarray(small[name]), rtol=1e-6)


def test_bad_arguments_get_clear_errors():
  params, grads, labels = _tree(2)
  tx = agm_lib.agm(optax.sgd(1.0), labels, alpha=1.0)
  state = tx.init(params)
  with pytest.raises(ValueError, match="mono_losses"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match=r"shape \(2,\)"):
    tx.update(grads, state, params, mono_losses=jnp.ones(3))
  with pytest.raises(ValueError, match="alpha"):
    agm_lib.agm(optax.sgd(1.0), labels, alpha=0.0)
  with pytest.raises(ValueError, match="scope"):
    agm_lib.agm(optax.sgd(1.0), labels, alpha=1.0, scope="encoder")
  with pytest.raises(ValueError, match="window"):
    agm_lib.agm(optax.sgd(1.0), labels, alpha=1.0, window=(3, 1))
  with pytest.raises(ValueError, match="clip"):
    agm_lib.agm(optax.sgd(1.0), {k: "main:0" if k.endswith("0") else "main:1" for k in params
                                 if k != "head"} | {"head": "main:1"}, alpha=1.0,
                clip=1.0).init(params)
  model, variables, inputs = _tiny(2)
  with pytest.raises(ValueError, match="labels must be int"):
    agm_lib.mono_modal_losses(model, variables, inputs, jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="N >= 2"):
    agm_lib.mono_modal_outputs(model, variables, inputs[:1])


def test_mono_modal_losses_of_an_nnx_model_and_a_clear_error_without_its_variables():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a, self.b = nnx.Linear(3, 2, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, inputs, *, train, cut=-1, drop=None):
      logits = jnp.stack([self.a(inputs[0]), self.b(inputs[1])])
      return logits.sum(0), logits

  model, rng = Net(nnx.Rngs(0)), np.random.default_rng(0)
  inputs = (rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 2, 5))
  # A linear sum of branches: φ_k is branch k's logits plus half the bias of the other.
  phi = [model.a(inputs[0]) + model.b.bias[...] / 2 - model.a.bias[...] / 2,
         model.b(inputs[1]) + model.a.bias[...] / 2 - model.b.bias[...] / 2]
  expected = [float(agm_lib.clamped_cross_entropy(p, y).mean()) for p in phi]
  variables = gml_jax.nnx.wrap(model).init()
  np.testing.assert_allclose(agm_lib.mono_modal_losses(model, variables, inputs, y), expected,
                             rtol=1e-5)
  with pytest.raises(TypeError, match=r"must be a dict of collections \['params'\].*NoneType"):
    agm_lib.mono_modal_losses(model, None, inputs, y)


def test_docstring_examples():
  assert doctest.testmod(agm_lib, raise_on_error=False).failed == 0
