"""MMPareto (gml_jax.mmpareto) against NumPy computations written out by hand: the two-task
min-norm weights (by a grid search over the segment), the per-modality cosine rule, the
doubling, the rescaling to the plain sum's norm and γ, on tiny trees."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gml_jax import mmpareto as mp

_COMPILED = {}


def _jit(tx):
  """tx.update compiled once per transform."""
  if id(tx) not in _COMPILED:
    _COMPILED[id(tx)] = (tx, jax.jit(
        lambda g, s, p, loss_grads: tx.update(g, s, p, loss_grads=loss_grads)))
  return _COMPILED[id(tx)][1]


def _grid_min_norm(g1, g2):
  """argmin over c in [0, 1] of ‖c g1 + (1 - c) g2‖, by a fine grid: no closed form."""
  c = np.linspace(0.0, 1.0, 200001)
  norms = np.linalg.norm(c[:, None] * g1[None] + (1 - c[:, None]) * g2[None], axis=1)
  return c[np.argmin(norms)]


@pytest.mark.parametrize("g1,g2", [
    ([1.0, 0.0], [-1.0, 1.0]),  # conflicting: interior solution 0.6
    ([3.0, -1.0, 2.0], [-1.0, 0.5, -0.5]),
    ([0.2, 0.1], [-3.0, 0.5]),
])
def test_min_norm_weight_is_the_minimum_of_the_segment(g1, g2):
  g1, g2 = np.array(g1), np.array(g2)
  got = mp.min_norm_weight(g1 @ g1, g1 @ g2, g2 @ g2)
  np.testing.assert_allclose(got, _grid_min_norm(g1, g2), atol=2e-5)


def test_min_norm_end_points_are_the_authors_clamps():
  g1, g2 = np.array([1.0, 0.0]), np.array([3.0, 1.0])  # ⟨g1, g2⟩ >= ‖g1‖²: g1 is the answer
  assert float(mp.min_norm_weight(g1 @ g1, g1 @ g2, g2 @ g2)) == pytest.approx(0.999)
  assert float(mp.min_norm_weight(g2 @ g2, g1 @ g2, g1 @ g1)) == pytest.approx(0.001)
  assert float(mp.min_norm_weight(0.0, 0.0, 0.0)) == pytest.approx(0.999)  # both zero
  assert float(mp.pareto_weight(1.0, 0.2, 4.0)) == 0.5  # agreeing: plain average


def _np_combine(g_fused, g_own, plains, gamma, w_exact=None):
  """By hand, one modality over its leaves: the weights from the concatenated leaves (a grid
  search where they conflict), then per leaf 2 (w g_m + (1 - w) g_k), enlarged to ‖plain‖
  where shorter, times γ. ``w_exact``: the weight to combine with (the grid's is only good
  to its step, which near-cancelling gradients amplify); checked against the grid's."""
  a, b = np.concatenate([g.ravel() for g in g_fused]), np.concatenate([g.ravel() for g in g_own])
  if a @ b > 0:
    w = 0.5
  elif a @ b >= a @ a:
    w = 0.999
  elif a @ b >= b @ b:
    w = 0.001
  else:
    w = _grid_min_norm(a, b)
  if w_exact is not None:
    np.testing.assert_allclose(w_exact, w, atol=2e-5)
    w = w_exact
  out = []
  for gm, gk, plain in zip(g_fused, g_own, plains):
    c = 2 * (w * gm + (1 - w) * gk)
    scale = max(1.0, np.linalg.norm(plain) / np.linalg.norm(c)) if np.linalg.norm(c) else 1.0
    out.append(gamma * scale * c)
  cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) if a.any() and b.any() else 0.0
  return w, cos, out


def _problem(n, seed=0, conflict=True):
  """Encoders enc<k> (two leaves each: kernel [2, 2], bias [2]), a head labelled other, and
  per-loss gradients [n + 1, ...] of a late-fusion model: loss i reaches encoder k only for
  i = 0 (fused) and i = 1 + k (its own)."""
  rng = np.random.default_rng(seed)
  shapes = {"kernel": (2, 2), "bias": (2,)}
  params, labels, loss_grads = {}, {}, {}
  for k in range(n):
    for leaf, shape in shapes.items():
      name = f"enc{k}_{leaf}"
      params[name] = jnp.zeros(shape, jnp.float32)
      labels[name] = f"main:{k}"
      g = np.zeros((n + 1,) + shape)
      g[0] = rng.normal(size=shape)
      g[1 + k] = (-1.5 if conflict and k == 0 else 0.7) * g[0] + 0.3 * rng.normal(size=shape)
      loss_grads[name] = jnp.asarray(g, jnp.float32)
  params["head"], labels["head"] = jnp.zeros(3, jnp.float32), "other"
  loss_grads["head"] = jnp.asarray(rng.normal(size=(n + 1, 3)), jnp.float32)
  return params, labels, loss_grads


@pytest.mark.parametrize("n", [2, 3])
def test_update_combines_each_encoder_by_hand(n):
  params, labels, loss_grads = _problem(n)
  grads = jax.tree.map(lambda g: jnp.sum(g, axis=0), loss_grads)  # the summed loss's gradient
  tx = mp.mmpareto(optax.sgd(1.0), labels, gamma=1.5)
  updates, state = _jit(tx)(grads, tx.init(params), params, loss_grads=loss_grads)
  enlarged = 0
  for k in range(n):
    names = [f"enc{k}_kernel", f"enc{k}_bias"]
    g = [np.asarray(loss_grads[name]) for name in names]
    w, cos, out = _np_combine([x[0] for x in g], [x[1 + k] for x in g], [x.sum(0) for x in g],
                              1.5, w_exact=float(state.fused_weights[k]))
    assert (cos < 0) == (k == 0)  # modality 0 conflicts, the others agree
    np.testing.assert_allclose(state.fused_weights[k], w, atol=2e-5)
    np.testing.assert_allclose(state.cosines[k], cos, rtol=1e-5)
    for name, expected, x in zip(names, out, g):
      np.testing.assert_allclose(updates[name], -expected, rtol=1e-4, atol=1e-5)
      c = 2 * (w * x[0] + (1 - w) * x[1 + k])
      enlarged += np.linalg.norm(c) < np.linalg.norm(x.sum(0))
      if k > 0:  # agreeing: 2 (g_m + g_k) / 2 is the plain sum, so γ times the sum
        np.testing.assert_allclose(updates[name], -1.5 * x.sum(0), rtol=1e-5)
  assert enlarged >= 1  # the rescaling was exercised
  np.testing.assert_allclose(updates["head"], -np.asarray(grads["head"]), rtol=1e-6)
  assert set(state.train_metrics()) == set(mp.MMParetoState.METRICS)
  assert mp.MMParetoState.NEEDS == ("loss_grads",)


def test_two_conflicting_vectors_weights_and_rescaling_by_hand():
  # g_m = (1, 0), g_0 = (-1, 1): ⟨g_m, g_0⟩ = -1, so c = (2 + 1) / (1 + 2 + 2) = 0.6 and
  # 2 (0.6 g_m + 0.4 g_0) = (0.4, 0.8), norm √0.8 < ‖g_m + g_0‖ = 1: enlarged to (1, 2)/√5.
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  loss_grads = {"a": jnp.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]]),
                "b": jnp.array([[0.0, 2.0], [0.0, 0.0], [0.0, 1.0]])}
  tx = mp.mmpareto(optax.sgd(1.0), {"a": "main:0", "b": "main:1"}, gamma=2.0)
  grads = jax.tree.map(lambda g: g.sum(0), loss_grads)
  updates, state = _jit(tx)(grads, tx.init(params), params, loss_grads=loss_grads)
  np.testing.assert_allclose(state.fused_weights, [0.6, 0.5], rtol=1e-6)
  np.testing.assert_allclose(state.cosines, [-1 / np.sqrt(2), 1.0], rtol=1e-6)
  np.testing.assert_allclose(updates["a"], -2.0 * np.array([1.0, 2.0]) / np.sqrt(5), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], -2.0 * np.array([0.0, 3.0]), rtol=1e-6)


def test_no_gradient_edge_cases_and_cross_modal_norms():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  labels = {"a": "main:0", "b": "main:1"}
  # Modality 0: the fused loss does not reach its encoder (g_m = 0): weights (0.999, 0.001),
  # 0.002 g_0 enlarged to ‖g_0‖, i.e. γ g_0. Modality 1: no gradient at all: stays 0.
  # Leaf b also carries branch 0's loss in the plain sum only (cross-modal fusion).
  loss_grads = {"a": jnp.array([[0.0, 0.0], [3.0, -4.0], [0.0, 0.0]]),
                "b": jnp.zeros((3, 2))}
  tx = mp.mmpareto(optax.sgd(1.0), labels, gamma=1.5)
  grads = jax.tree.map(lambda g: g.sum(0), loss_grads)
  updates, state = _jit(tx)(grads, tx.init(params), params, loss_grads=loss_grads)
  np.testing.assert_allclose(state.fused_weights, [0.999, 0.999], rtol=1e-6)
  np.testing.assert_allclose(updates["a"], -1.5 * np.array([3.0, -4.0]), rtol=1e-5)
  np.testing.assert_array_equal(updates["b"], 0.0)
  assert np.all(np.isfinite(state.cosines)) and float(state.cosines[1]) == 0.0

  cross = {"a": loss_grads["a"],
           "b": jnp.array([[1.0, 0.0], [0.0, 6.0], [1.0, 0.0]])}  # [1] is branch 0's loss
  updates, state = _jit(tx)(jax.tree.map(lambda g: g.sum(0), cross), tx.init(params), params,
                            loss_grads=cross)
  # Aligned (cos 1): direction 2 (g_m + g_1)/2 = (2, 0), norm 2 < ‖(2, 6)‖ = √40: enlarged.
  np.testing.assert_allclose(updates["b"], -1.5 * np.array([np.sqrt(40), 0.0]), rtol=1e-5)


def test_bad_arguments_get_clear_errors():
  params, labels, loss_grads = _problem(2)
  grads = jax.tree.map(lambda g: g.sum(0), loss_grads)
  tx = mp.mmpareto(optax.sgd(1.0), labels)
  state = tx.init(params)
  with pytest.raises(ValueError, match="loss_grads"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match=r"\(N \+ 1, \*leaf\)"):
    tx.update(grads, state, params, loss_grads=jax.tree.map(lambda g: g[:2], loss_grads))
  with pytest.raises(ValueError, match="tree like the gradients"):
    tx.update(grads, state, params, loss_grads={"head": loss_grads["head"]})
  with pytest.raises(ValueError, match="gamma"):
    mp.mmpareto(optax.sgd(1.0), labels, gamma=0)


def test_docstring_examples():
  assert doctest.testmod(mp, raise_on_error=False).failed == 0
