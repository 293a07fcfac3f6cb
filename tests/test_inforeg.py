"""InfoReg (gml_jax.inforeg) and the epoch hook (gml_jax.epochs) against NumPy by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gml_jax import epochs, inforeg, pmr

LABELS = {"a": "main:0", "a_bias": "main:0", "b": "main:1", "fuse": "fusion:shared",
          "head": "other"}
SHAPES = {"a": (2, 2), "a_bias": (2,), "b": (3, 1), "fuse": (2,), "head": (2, 2)}


def _tree(rng, scale=None):
  scale = scale or {}
  return {k: jnp.asarray(rng.normal(size=s) * scale.get(LABELS[k], 1.0), jnp.float32)
          for k, s in SHAPES.items()}


def _np_rates(traces, history):
  """The authors' rule: a list that starts with H zeros, each finished epoch's trace
  appended; r = (mean of the last H − mean of the H before the last) / mean of the last H."""
  out = []
  values = [0.0] * history
  for t in traces:
    values.append(t)
    new, old = np.mean(values[-history:]), np.mean(values[-history - 1:-1])
    out.append((new - old) / new if new > 0 else 0.0)
  return out


_start = jax.jit(lambda state, params: epochs.epoch_start(state, params=params))


def test_trace_and_the_window_opening_and_closing_by_hand():
  tx = inforeg.inforeg(optax.sgd(0.1), LABELS, strength=1.0, threshold=0.05, history=2)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  params = _tree(rng)
  state = tx.init(params)
  # Modality 0's gradients keep one scale, then jump (its window closes, then reopens);
  # modality 1's double every epoch (its window stays open).
  scales = [(1, 1), (1, 2), (1, 4), (1, 8), (3, 16)]
  traces = {0: [], 1: []}
  for epoch, (s0, s1) in enumerate(scales):
    state = _start(state, params)
    expected_rates = [1.0, 1.0] if epoch == 0 else [_np_rates(traces[k], 2)[-1] for k in (0, 1)]
    np.testing.assert_allclose(state.rates, expected_rates, rtol=1e-5)
    np.testing.assert_array_equal(state.open, np.array(expected_rates) > 0.05)
    total = [0.0, 0.0]
    for _ in range(3):
      grads = _tree(rng, {"main:0": s0, "main:1": s1})
      grads["a"] = jnp.full((2, 2), float(s0))  # traces 3 s² per epoch: rates known exactly
      grads["b"] = jnp.full((3, 1), float(s1))
      _, state = update(grads, state, params, scores=jnp.array([1.0, 1.0]))
      # The trace counts kernels only (rank >= 2): not the bias, nor other groups.
      total[0] += np.mean(np.square(grads["a"]))
      total[1] += np.mean(np.square(grads["b"]))
    np.testing.assert_allclose(state.trace, total, rtol=1e-5)
    traces[0].append(total[0])
    traces[1].append(total[1])
  state = _start(state, params)
  np.testing.assert_allclose(state.history[:, -1], [traces[0][-1], traces[1][-1]], rtol=1e-5)
  np.testing.assert_allclose(state.history[:, -2], [traces[0][-2], traces[1][-2]], rtol=1e-5)
  # The pattern this test is about: modality 0's window closed in epochs 3 and 4 (no
  # growth) and reopened after its jump; modality 1's never closed.
  rates0 = _np_rates(traces[0], 2)
  opened = [r > 0.05 for r in rates0]
  assert opened == [True, True, False, False, True]
  assert all(r > 0.05 for r in _np_rates(traces[1], 2))
  assert bool(state.open[0]) and bool(state.open[1])
  assert float(state.train_metrics()["inforeg_trace"][0]) == pytest.approx(traces[0][-1])


def test_the_pull_toward_the_epoch_start_parameters_by_hand():
  tx = inforeg.inforeg(optax.sgd(0.1, momentum=0.9), LABELS, strength=(0.95, 0.1))
  update = jax.jit(tx.update)
  rng = np.random.default_rng(1)
  anchor = _tree(rng)
  state = _start(tx.init(anchor), anchor)
  velocity = {k: np.zeros(s) for k, s in SHAPES.items()}
  params = _tree(rng)
  for scores in ([5.0, 3.0], [2.0, 6.0], [3.0, 3.0]):
    grads = _tree(rng)
    updates, state = update(grads, state, params, scores=jnp.asarray(scores))
    gap = scores[0] - scores[1]
    beta = [0.95 * np.exp(np.tanh(gap)) if gap > 0 else 0.0,
            0.1 * np.exp(np.tanh(-gap)) if gap < 0 else 0.0]
    np.testing.assert_allclose(state.betas, beta, rtol=1e-6)
    for name in SHAPES:
      kind, _, k = LABELS[name].partition(":")
      pulled = np.asarray(grads[name], np.float64)
      if kind == "main":  # every leaf of the branch, biases too, toward the epoch start
        pulled = pulled + beta[int(k)] * (np.asarray(params[name]) - np.asarray(anchor[name]))
      velocity[name] = 0.9 * velocity[name] + pulled  # momentum sees the pulled gradient
      np.testing.assert_allclose(updates[name], -0.1 * velocity[name], rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, updates)


def test_a_closed_window_pulls_nothing_and_window_modality_pins_every_window():
  rng = np.random.default_rng(2)
  params = _tree(rng)
  for window_modality, expected_open in ((None, [False, True]), (0, [False, False])):
    tx = inforeg.inforeg(optax.sgd(-1.0), LABELS, strength=1.0, history=1,
                         window_modality=window_modality)
    update = jax.jit(tx.update)
    state = _start(tx.init(params), params)
    for s0, s1 in ((1.0, 1.0), (1.0, 2.0)):  # two epochs: modality 0 flat, modality 1 grows
      grads = _tree(rng, {"main:0": s0, "main:1": s1})
      grads["a"] = jnp.full((2, 2), s0)
      grads["b"] = jnp.full((3, 1), s1)
      _, state = update(grads, state, params, scores=jnp.array([1.0, 1.0]))
      state = _start(state, params)
    np.testing.assert_array_equal(state.open, expected_open)
    # Modality 0 leads but its window is closed: nothing is pulled.
    moved = jax.tree.map(lambda p: p + 1.0, params)
    grads = _tree(rng)
    updates, state = update(grads, state, moved, scores=jnp.array([9.0, 1.0]))
    np.testing.assert_array_equal(state.betas, [0.0, 0.0])
    for name in SHAPES:
      np.testing.assert_allclose(updates[name], grads[name], rtol=1e-6)


def test_three_modalities_lead_against_the_mean_of_the_others():
  labels = {"m0": "main:0", "m1": "main:1", "m2": "main:2", "h": "other"}
  rng = np.random.default_rng(3)
  params = {k: jnp.asarray(rng.normal(size=(2, 2)), jnp.float32) for k in labels}
  anchor = {k: jnp.asarray(rng.normal(size=(2, 2)), jnp.float32) for k in labels}
  tx = inforeg.inforeg(optax.sgd(-1.0), labels, strength=(0.5, 0.7, 0.9))
  state = _start(tx.init(params), anchor)
  grads = {k: jnp.zeros((2, 2)) for k in labels}
  scores = np.array([4.0, 3.0, 1.0])
  updates, state = jax.jit(tx.update)(grads, state, params, scores=jnp.asarray(scores))
  gaps = [s - np.mean(np.delete(scores, k)) for k, s in enumerate(scores)]  # 2, 0.5, -2.5
  beta = [c * np.exp(np.tanh(g)) if g > 0 else 0.0 for c, g in zip((0.5, 0.7, 0.9), gaps)]
  np.testing.assert_allclose(state.betas, beta, rtol=1e-6)
  for k in range(3):
    np.testing.assert_allclose(updates[f"m{k}"],
                               beta[k] * (np.asarray(params[f"m{k}"]) - anchor[f"m{k}"]),
                               rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(updates["h"], 0.0)


def test_epoch_hook_needs_and_errors():
  rng = np.random.default_rng(4)
  params = _tree(rng)
  chain = optax.chain(
      pmr.pmr(optax.identity(), num_classes=2, feature_dims=(2, 2), alpha=1.0),
      inforeg.inforeg(optax.sgd(0.1), LABELS, strength=1.0))
  state = chain.init(params)
  assert epochs.epoch_needs(state) == ("params", "prototype_sums")
  assert epochs.epoch_needs(optax.sgd(0.1).init(params)) == ()
  with pytest.raises(ValueError, match=r"need \['params', 'prototype_sums'\]"):
    epochs.epoch_start(state)
  with pytest.raises(ValueError, match="unknown inputs"):
    epochs.epoch_start(state, epoch=3)
  sums = pmr.PrototypeSums((jnp.ones((2, 2)), jnp.ones((2, 2))), jnp.ones(2))
  started = epochs.epoch_start(state, params=params, prototype_sums=sums)
  assert int(pmr.pmr_state(started).epochs_started) == 1
  assert int(inforeg.inforeg_state(started).epochs_started) == 1
  assert set(inforeg.inforeg_state(started).train_metrics()) == set(
      inforeg.InfoRegState.METRICS)


def test_bad_arguments_are_named():
  params = _tree(np.random.default_rng(5))
  with pytest.raises(ValueError, match="strength must be"):
    inforeg.inforeg(optax.sgd(1.0), LABELS, strength=(1.0, 2.0, 3.0)).init(params)
  with pytest.raises(ValueError, match="threshold must be"):
    inforeg.inforeg(optax.sgd(1.0), LABELS, strength=1.0, threshold=float("nan"))
  with pytest.raises(ValueError, match="history must be"):
    inforeg.inforeg(optax.sgd(1.0), LABELS, strength=1.0, history=0)
  with pytest.raises(ValueError, match="window_modality must be"):
    inforeg.inforeg(optax.sgd(1.0), LABELS, strength=1.0, window_modality=2).init(params)
  tx = inforeg.inforeg(optax.sgd(1.0), LABELS, strength=1.0)
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs the branches' scores"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match=r"scores must have shape \(2,\)"):
    tx.update(params, state, params, scores=jnp.ones(3))
  with pytest.raises(ValueError, match="N >= 2 modalities"):
    inforeg.inforeg(optax.sgd(1.0), {k: "main:0" for k in LABELS}, strength=1.0).init(params)
  with pytest.raises(ValueError, match=r"do not have the structure.*With NNX, keep the opt"):
    epochs.epoch_start(state, params={"a": jnp.zeros(1)})
