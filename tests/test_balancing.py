"""The balancing transform against independent NumPy computations (spec §2, §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gml_jax
from gml_jax.balancing import BalanceState


def _tree(rng, shapes):
  return {name: jnp.asarray(rng.normal(size=shape), jnp.float32) for name, shape in shapes.items()}


SHAPES = {
    "m0_w": (3, 4), "m0_b": (4,), "m1_w": (5,), "m2_w": (2, 2),
    "f0": (3,), "f1": (2, 3), "f2": (4,), "sq": (6,), "extra": (7,),
}
LABELS = {
    "m0_w": "main:0", "m0_b": "main:0", "m1_w": "main:1", "m2_w": "main:2",
    "f0": "fusion:0", "f1": "fusion:1", "f2": "fusion:2", "sq": "fusion:shared",
    "extra": "other",
}


def _problem(n):
  """Params and labels of an n-modality model (n = 2 drops modality 2's leaves)."""
  keep = [k for k in SHAPES if not (n == 2 and k in ("m2_w", "f2"))]
  return {k: SHAPES[k] for k in keep}, {k: LABELS[k] for k in keep}


def _numpy_mu(grads, params, labels, n):
  sq = lambda t, k: float(np.sum(np.square(np.asarray(t[k], np.float64))))
  mu_main, mu_fusion = np.zeros(n), np.zeros(n)
  for k in range(n):
    main = [name for name, lab in labels.items() if lab == f"main:{k}"]
    fusion = [name for name, lab in labels.items() if lab in (f"fusion:{k}", "fusion:shared")]
    mu_main[k] = sum(sq(grads, x) for x in main) / sum(sq(params, x) for x in main)
    mu_fusion[k] = sum(sq(grads, x) for x in fusion) / sum(sq(params, x) for x in fusion)
  return mu_main, mu_fusion


@pytest.mark.parametrize("n", [2, 3])
def test_mu_accumulators_and_speeds_match_numpy(n):
  rng = np.random.default_rng(n)
  shapes, labels = _problem(n)
  params = _tree(rng, shapes)
  tx = gml_jax.balanced_multimodal(optax.sgd(0.05), labels, method="vanilla")
  state = tx.init(params)
  update = jax.jit(tx.update)
  accum_main, accum_fusion = np.zeros(n), np.zeros(n)
  for _ in range(4):
    grads = _tree(rng, shapes)
    mu_main, mu_fusion = _numpy_mu(grads, params, labels, n)
    accum_main, accum_fusion = accum_main + mu_main, accum_fusion + mu_fusion
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(state.mu_main, mu_main, rtol=1e-5)
    np.testing.assert_allclose(state.mu_fusion, mu_fusion, rtol=1e-5)
    np.testing.assert_allclose(state.accum_main, accum_main, rtol=1e-5)
    np.testing.assert_allclose(state.accum_fusion, accum_fusion, rtol=1e-5)
    speeds = np.log10(accum_fusion / accum_main)
    np.testing.assert_allclose(gml_jax.modality_speeds(state), speeds, rtol=1e-5, atol=1e-6)
    gap = speeds[0] - speeds[1] if n == 2 else speeds.max() - speeds.min()
    np.testing.assert_allclose(gml_jax.speed_gap(gml_jax.modality_speeds(state)), gap, atol=1e-5)


# --------------------------------------------------------------------------------------
# State machine on scripted speeds. Parameters are all ones and each group has one leaf,
# so μ of a group is the square of its gradient value: the test scripts μ directly.


def _scripted(n):
  params = {f"m{k}": jnp.ones(()) for k in range(n)} | {f"f{k}": jnp.ones(()) for k in range(n)}
  labels = {f"m{k}": f"main:{k}" for k in range(n)} | {f"f{k}": f"fusion:{k}" for k in range(n)}
  return params, labels


def _grads_for(mu_main, mu_fusion):
  return {f"m{k}": jnp.sqrt(jnp.float32(v)) for k, v in enumerate(mu_main)} | {
      f"f{k}": jnp.sqrt(jnp.float32(v)) for k, v in enumerate(mu_fusion)
  }


def _run(tx, params, mus):
  """Targets used at each step, and the states after each step."""
  state, targets, states = tx.init(params), [], []
  update = jax.jit(tx.update)
  for mu_main, mu_fusion in mus:
    targets.append(int(gml_jax.rebalance_target(state)))
    _, state = update(_grads_for(mu_main, mu_fusion), state, params)
    states.append(state)
  return targets, states


def _reference_guided(mus, alpha, window, warmup):
  """The spec's state machine, written out plainly in NumPy."""
  n = len(mus[0][0])
  m_main, m_fus = np.zeros(n), np.zeros(n)
  target, left, targets = -1, 0, []
  for t, (mu_main, mu_fusion) in enumerate(mus):
    targets.append(target)
    if target >= 0:  # re-balancing step: M frozen, count down the window
      left -= 1
      if left == 0:
        target = -1
      continue
    m_main, m_fus = m_main + mu_main, m_fus + mu_fusion
    s = np.log10(m_fus / m_main)
    spread = s[0] - s[1] if n == 2 else s.max() - s.min()
    if t >= warmup and abs(spread) > alpha:
      target, left = int(np.argmax(s)), window
  return targets


def test_guided_warmup_window_and_both_directions():
  params, labels = _scripted(2)
  tx = gml_jax.balanced_multimodal(
      optax.sgd(0.1), labels, method="guided", alpha=0.1, window=3, warmup_steps=2
  )
  # Modality 0 learns mostly through fusion (s_0 = 1, s_1 = 0): re-balance 0.
  favour_0 = ([1.0, 1.0], [10.0, 1.0])
  targets, states = _run(tx, params, [favour_0] * 12)
  assert targets == [-1, -1, -1, 0, 0, 0, -1, 0, 0, 0, -1, 0]
  # M is frozen during the window (steps 3, 4, 5) and moves on normal steps.
  accum = [np.asarray(s.accum_main).copy() for s in states]
  np.testing.assert_array_equal(accum[2], accum[3])
  np.testing.assert_array_equal(accum[2], accum[5])
  np.testing.assert_allclose(accum[6], accum[5] + 1.0)
  assert np.asarray(states[-1].rebalance_steps).tolist() == [targets.count(0), 0] == [7, 0]

  # The other direction: s_1 > s_0 re-balances modality 1.
  favour_1 = ([1.0, 1.0], [1.0, 10.0])
  targets, _ = _run(tx, params, [favour_1] * 5)
  assert targets == [-1, -1, -1, 1, 1]

  # Below the threshold (|d_speed| = log10(1.2) < 0.1): never re-balance.
  balanced = ([1.0, 1.0], [1.2, 1.0])
  targets, _ = _run(tx, params, [balanced] * 8)
  assert targets == [-1] * 8


@pytest.mark.parametrize("n", [2, 3])
def test_guided_matches_reference_on_random_speeds(n):
  rng = np.random.default_rng(7 + n)
  params, labels = _scripted(n)
  mus = [(rng.uniform(0.5, 2, n), rng.uniform(0.5, 2, n)) for _ in range(60)]
  tx = gml_jax.balanced_multimodal(
      optax.sgd(0.1), labels, method="guided", alpha=0.05, window=4, warmup_steps=5
  )
  targets, _ = _run(tx, params, mus)
  assert targets == _reference_guided(mus, alpha=0.05, window=4, warmup=5)
  assert {t for t in targets if t >= 0} and targets[:6] == [-1] * 6


def test_random_method_is_reproducible_and_draws_every_choice():
  params, labels = _scripted(3)
  mus = [([1.0] * 3, [1.0] * 3)] * 60
  make = lambda seed: gml_jax.balanced_multimodal(
      optax.sgd(0.1), labels, method="random", warmup_steps=10, seed=seed
  )
  first, states = _run(make(3), params, mus)
  again, _ = _run(make(3), params, mus)
  other, _ = _run(make(4), params, mus)
  assert first == again
  assert first != other
  assert first[:10] == [-1] * 10
  assert set(first[10:]) == {-1, 0, 1, 2}
  # M does not move on re-balancing steps of the random method either.
  for t in range(1, 60):
    if first[t] >= 0:
      np.testing.assert_array_equal(states[t].accum_main, states[t - 1].accum_main)


def _reference_fixed(steps, target, window, warmup):
  """The fixed control written out plainly: warm-up, then one normal step and ``window``
  re-balancing steps for ``target``, repeated."""
  targets = []
  for t in range(steps):
    after = t - warmup  # the first normal step after warm-up is 0
    targets.append(-1 if after < 0 or after % (window + 1) == 0 else target)
  return targets


@pytest.mark.parametrize("target,window,warmup", [(0, 5, 30), (1, 1, 0), (2, 4, 7)])
def test_fixed_method_runs_guided_schedule_with_a_pinned_target(target, window, warmup):
  params, labels = _scripted(3)
  rng = np.random.default_rng(target)
  # Speeds that would send guided elsewhere (or nowhere): fixed reads none of them.
  mus = [(rng.uniform(0.5, 2, 3), rng.uniform(0.5, 2, 3)) for _ in range(300)]
  tx = gml_jax.balanced_multimodal(optax.sgd(0.1), labels, method="fixed", target=target,
                                   window=window, warmup_steps=warmup, alpha=100.0)
  targets, states = _run(tx, params, mus)
  assert targets == _reference_fixed(300, target, window, warmup)
  counts = np.asarray(states[-1].rebalance_steps).tolist()
  assert counts[target] == targets.count(target) and sum(counts) == counts[target]


def test_fixed_equals_guided_where_every_speed_test_passes():
  params, labels = _scripted(2)
  favour_0 = ([1.0, 1.0], [10.0, 1.0])  # d_speed = 1 > alpha at every normal step
  make = lambda **kw: gml_jax.balanced_multimodal(optax.sgd(0.1), labels, window=3,
                                                  warmup_steps=4, **kw)
  guided, _ = _run(make(method="guided", alpha=0.01), params, [favour_0] * 40)
  fixed, _ = _run(make(method="fixed", target=0), params, [favour_0] * 40)
  assert fixed == guided


def test_random_shares_are_matched_and_reproducible():
  params, labels = _scripted(2)
  mus = [([1.0] * 2, [1.0] * 2)] * 2000
  make = lambda seed: gml_jax.balanced_multimodal(
      optax.sgd(0.1), labels, method="random", shares=(0.75, 0.0), warmup_steps=100, seed=seed)
  first, _ = _run(make(1), params, mus)
  again, _ = _run(make(1), params, mus)
  other, _ = _run(make(2), params, mus)
  assert first == again and first != other
  after = np.asarray(first[100:])
  assert first[:100] == [-1] * 100 and not np.any(after == 1)
  # 1,900 draws at p = 0.75: the standard error of the share is 0.01.
  assert abs(np.mean(after == 0) - 0.75) < 0.035


def test_controls_refuse_what_they_cannot_do():
  params, labels = _scripted(2)
  with pytest.raises(ValueError, match="shares are for method='random'"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), labels, method="guided", shares=(0.5, 0.5))
  with pytest.raises(ValueError, match="summing to at most 1; got \\[0.75, 0.5\\]"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), labels, method="random", shares=(0.75, 0.5))
  with pytest.raises(ValueError, match="shares has 3 values; the labels have 2"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), labels, method="random",
                                shares=(0.1, 0.1, 0.1)).init(params)
  with pytest.raises(ValueError, match="target=2 names no modality: the labels have 2"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), labels, method="fixed", target=2).init(params)
  with pytest.raises(ValueError, match="target must be a modality index"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), labels, method="fixed", target=-1)


def test_vanilla_never_rebalances_but_measures():
  params, labels = _scripted(2)
  tx = gml_jax.balanced_multimodal(optax.sgd(0.1), labels, method="vanilla")
  targets, states = _run(tx, params, [([1.0, 1.0], [100.0, 1.0])] * 6)
  assert targets == [-1] * 6
  np.testing.assert_allclose(gml_jax.modality_speeds(states[-1]), [2.0, 0.0], atol=1e-6)


# --------------------------------------------------------------------------------------
# Masking in re-balancing steps


def _forced_rebalance(inner, update, target):
  """Takes one normal step that triggers re-balancing of ``target``, then the
  re-balancing step; returns (params, state) before and after the latter."""
  rng = np.random.default_rng(0)
  shapes, labels = _problem(2)
  params = _tree(rng, shapes)
  tx = gml_jax.balanced_multimodal(inner, labels, alpha=0.0, window=2, update=update)
  state = tx.init(params)
  grads = _tree(rng, shapes)
  # Large gradients on the fusion head into `target` make its speed the largest.
  grads[f"f{target}"] = grads[f"f{target}"] * 100.0
  updates, state = tx.update(grads, state, params)
  params = optax.apply_updates(params, updates)
  assert int(gml_jax.rebalance_target(state)) == target
  # In the re-balancing step the fusion head into `target` gets no gradient (as a cut
  # forward pass would give); everything else does.
  grads = _tree(rng, shapes)
  grads[f"f{target}"] = jnp.zeros_like(grads[f"f{target}"])
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  return labels, params, state, optax.apply_updates(params, updates), new_state


INNERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(0.1),
}


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("target", [0, 1])
def test_branch_update_moves_only_main_k(inner, target):
  labels, before, state, after, new_state = _forced_rebalance(INNERS[inner](), "branch", target)
  for name, label in labels.items():
    moved = not np.array_equal(before[name], after[name])
    assert moved == (label == f"main:{target}"), (name, label)
  # The optimizer state of frozen leaves is untouched too (momentum, Adam moments).
  old_leaves = jax.tree_util.tree_leaves_with_path(state.inner_state)
  new_leaves = dict(jax.tree_util.tree_leaves_with_path(new_state.inner_state))
  for path, old in old_leaves:
    key = getattr(path[-1], "key", None)
    if key in labels and labels[key] != f"main:{target}":
      np.testing.assert_array_equal(new_leaves[path], old)


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_all_update_moves_everything_with_a_gradient(inner):
  labels, before, _, after, _ = _forced_rebalance(INNERS[inner](), "all", 1)
  for name, label in labels.items():
    moved = not np.array_equal(before[name], after[name])
    assert moved == (label != "fusion:1"), (name, label)


def test_update_mask_follows_the_mode():
  labels = {"a": "main:0", "b": "main:1", "f0": "fusion:0", "s": "fusion:shared", "o": "other"}
  tree = {k: jnp.zeros(()) for k in labels}
  for update_all, expected in [
      (False, {"a": False, "b": True, "f0": False, "s": False, "o": False}),
      (True, {"a": True, "b": True, "f0": True, "s": True, "o": True}),
  ]:
    state = BalanceState(*([None] * len(BalanceState._fields)))._replace(
        target=jnp.int32(1), update_all=jnp.asarray(update_all)
    )
    mask = gml_jax.update_mask(state, labels, tree)
    assert {k: bool(v) for k, v in mask.items()} == expected
  normal = state._replace(target=jnp.int32(-1), update_all=jnp.asarray(False))
  assert all(bool(v) for v in gml_jax.update_mask(normal, labels, tree).values())


def test_switching_modes_does_not_retrace():
  params, labels = _scripted(2)
  tx = gml_jax.balanced_multimodal(optax.adam(0.1), labels, alpha=0.0, window=1)
  traces = []

  @jax.jit
  def update(grads, state):
    traces.append(1)
    return tx.update(grads, state, params)

  state, seen = tx.init(params), set()
  for mu in ([1.0, 1.0], [10.0, 1.0]), ([1.0, 1.0], [1.0, 10.0]), ([1.0, 1.0], [10.0, 1.0]):
    for _ in range(2):
      seen.add(int(gml_jax.rebalance_target(state)))
      _, state = update(_grads_for(*mu), state)
  assert seen == {-1, 0, 1}
  assert len(traces) == 1


# --------------------------------------------------------------------------------------
# Bad input


def test_bad_arguments_are_named():
  params, labels = _scripted(2)
  with pytest.raises(ValueError, match="Unknown method 'greedy'"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), labels, method="greedy")
  with pytest.raises(ValueError, match="Unknown update mode"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), labels, update="some")
  with pytest.raises(ValueError, match="alpha"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), labels, alpha=-1)
  with pytest.raises(ValueError, match="window"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), labels, window=0)
  with pytest.raises(ValueError, match="warmup_steps"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), labels, warmup_steps=-2)
  with pytest.raises(ValueError, match="Unknown parameter-group label 'main0'"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), {**labels, "m0": "main0"}).init(params)
  with pytest.raises(ValueError, match="structure"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), {"m0": "main:0"}).init(params)
  no_fusion = {k: ("main:0" if k.endswith("0") else "main:1") for k in labels}
  with pytest.raises(ValueError, match="no fusion parameters"):
    gml_jax.balanced_multimodal(optax.sgd(1.0), no_fusion).init(params)
  tx = gml_jax.balanced_multimodal(optax.sgd(1.0), labels)
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="found 0"):
    gml_jax.rebalance_target(optax.sgd(1.0).init(params))


def test_accumulated_speed_stays_exact_over_many_steps():
  # 200,000 normal steps of decaying μ (as over a long run): M must match a float64 sum of
  # the very μ the transform measured, where a plain float32 running sum drifts.
  labels = {"m0": "main:0", "m1": "main:1", "f0": "fusion:0", "f1": "fusion:1"}
  params = {k: jnp.ones((4,), jnp.float32) for k in labels}
  tx = gml_jax.balanced_multimodal(optax.sgd(0.0), labels, method="vanilla")
  steps = 200_000
  scale = jnp.asarray([1.0, 0.7, 0.3, 0.9], jnp.float32)

  def step(state, t):
    decay = jnp.exp(-t.astype(jnp.float32) / 40_000.0)
    grads = {k: jnp.full((4,), s * decay, jnp.float32) for k, s in zip(labels, scale)}
    _, state = tx.update(grads, state, params)
    return state, (state.mu_main, state.mu_fusion)

  state, (mu_main, mu_fusion) = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(steps)))(
      tx.init(params))
  m_main, m_fusion = gml_jax.balancing.accumulated(state)
  exact_main = np.sum(np.asarray(mu_main, np.float64), axis=0)
  exact_fusion = np.sum(np.asarray(mu_fusion, np.float64), axis=0)
  np.testing.assert_allclose(m_main, exact_main, rtol=2e-7)
  np.testing.assert_allclose(m_fusion, exact_fusion, rtol=2e-7)
  naive = np.add.accumulate(np.asarray(mu_main, np.float32), axis=0)[-1]  # sequential float32
  assert np.max(np.abs(naive / exact_main - 1)) > 1e-5  # what the compensation removes
  speeds = np.log10(exact_fusion / exact_main)
  np.testing.assert_allclose(gml_jax.modality_speeds(state), speeds, atol=1e-6)


# --------------------------------------------------------------------------------------
# Silent pitfalls made loud (issue 36)


def _two_modality_problem(seed=0):
  shapes, labels = _problem(2)
  return _tree(np.random.default_rng(seed), shapes), labels


@pytest.mark.parametrize("after", ["trace", "scale_by_adam"])
def test_check_masking_catches_momentum_built_up_by_normal_steps(after):
  params, labels = _two_modality_problem()
  tail = {"trace": lambda: optax.trace(0.9), "scale_by_adam": optax.scale_by_adam}[after]
  tx = optax.chain(gml_jax.balanced_multimodal(optax.sgd(0.1), labels), tail())
  # The silent behaviour: from a fresh state a forced re-balancing step keeps m1_w in place
  # (what the one-step check saw), but after normal steps the momentum moves it.
  rng = np.random.default_rng(1)
  force = lambda s, t: (s[0]._replace(target=jnp.int32(t), window_left=jnp.int32(1)),) + s[1:]
  fresh, _ = tx.update(_tree(rng, _problem(2)[0]), force(tx.init(params), 0), params)
  assert np.all(np.asarray(fresh["m1_w"]) == 0)
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(_tree(rng, _problem(2)[0]), force(state, -1), params)
  updates, _ = tx.update(_tree(rng, _problem(2)[0]), force(state, 0), params)
  assert np.max(np.abs(np.asarray(updates["m1_w"]))) > 1e-4  # frozen, yet it moves
  with pytest.raises(ValueError, match=r"'m1_w' \(main:1\) in a step for modality 0.*"
                                       r"optax.trace / scale_by_adam.*outermost"):
    gml_jax.check_masking(tx, params, labels)
  inside = gml_jax.balanced_multimodal(optax.chain(optax.sgd(0.1), tail()), labels)
  assert gml_jax.check_masking(inside, params, labels) is None


def test_accumulation_inside_the_transform_is_refused_with_the_right_order():
  params, labels = _two_modality_problem()
  right_order = r"optax.MultiSteps\(balanced_multimodal\(inner, labels\), every_k_schedule=k\)"
  with pytest.raises(ValueError, match=r"\(MultiSteps: gradient accumulation\).*" + right_order):
    gml_jax.balanced_multimodal(optax.MultiSteps(optax.adamw(1e-3), 2), labels)
  inner = optax.MultiSteps(optax.adamw(1e-3), 2).gradient_transformation()
  tx = gml_jax.balanced_multimodal(inner, labels)  # only its state shows it
  with pytest.raises(ValueError, match=r"MultiStepsState.*" + right_order):
    tx.init(params)
  with pytest.raises(ValueError, match=right_order):
    gml_jax.check_masking(tx, params, labels)
  # Any other transform that applies no update on a normal step is caught by check_masking.
  silent = optax.chain(gml_jax.balanced_multimodal(optax.sgd(0.1), labels), optax.scale(0.0))
  with pytest.raises(ValueError, match=r"normal step 0 moved no parameter.*" + right_order):
    gml_jax.check_masking(silent, params, labels)
  around = optax.MultiSteps(gml_jax.balanced_multimodal(optax.sgd(0.1), labels), 2)
  assert gml_jax.check_masking(around.gradient_transformation(), params, labels) is None


def test_inject_hyperparams_is_refused_and_set_hyperparams_changes_the_inner_rate():
  params, labels = _two_modality_problem()
  injected = optax.inject_hyperparams(gml_jax.balanced_multimodal, static_args=("labels",))
  with pytest.raises(TypeError, match=r"alpha, window, warmup_steps, seed, target must be "
                                      r"Python numbers.*gml_jax.set_hyperparams"):
    injected(optax.sgd(0.1), labels, alpha=0.01).init(params)
  rules = gml_jax.label_rules([(r"m(\d)_.*", r"main:\1"), (r"f(\d)", r"fusion:\1"),
                               ("sq", "fusion:shared"), ("extra", "other")])
  with pytest.raises(ValueError, match=r"called as a schedule\?.*inject_hyperparams"):
    optax.inject_hyperparams(gml_jax.balanced_multimodal)(optax.sgd(0.1), rules).init(params)
  # The way: inject into the inner optimizer, then set it. A normal sgd step is -lr * g.
  tx = gml_jax.balanced_multimodal(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                                   labels, method="vanilla")
  state = tx.init(params)
  grads = _tree(np.random.default_rng(2), _problem(2)[0])
  state = gml_jax.set_hyperparams(state, learning_rate=0.025)
  updates, state = jax.jit(tx.update)(grads, state, params)
  for name in params:
    np.testing.assert_allclose(updates[name], -0.025 * np.asarray(grads[name]), rtol=1e-6)
  assert state.inner_state.hyperparams["learning_rate"].dtype == jnp.float32
  with pytest.raises(ValueError, match=r"\['momentum'\] injected nowhere.*\['learning_rate'\]"):
    gml_jax.set_hyperparams(state, momentum=0.9)


def test_a_nan_group_is_reported_as_nan_not_as_no_gradient():
  params, labels = _two_modality_problem()
  tx = gml_jax.balanced_multimodal(optax.sgd(0.1), labels, alpha=0.0)
  state = tx.init(params)
  grads = _tree(np.random.default_rng(3), _problem(2)[0])
  grads["m0_w"] = grads["m0_w"].at[0, 0].set(jnp.nan)  # e.g. a float16 overflow
  _, state = tx.update(grads, state, params)
  assert np.isnan(np.asarray(gml_jax.modality_speeds(state))[0])
  assert int(gml_jax.rebalance_target(state)) == -1  # guided stops re-balancing
  warnings = gml_jax.speed_warnings(state)
  assert any(w.startswith("Group main:0 is NaN or infinite") and "never re-balances" in w
             for w in warnings), warnings
  assert not any("no gradient" in w for w in warnings)
  # A group without any gradient is still told so.
  fresh = tx.init(params)
  _, fresh = tx.update(jax.tree.map(jnp.zeros_like, grads), fresh, params)
  assert "s_0 is undefined: main:0 and fusion:0 has had no gradient yet." in (
      gml_jax.speed_warnings(fresh))
  report = gml_jax.describe_speeds([np.nan, 0.2, np.nan, 0.3])
  assert report["undefined_steps"] == 2 and report["mean"] == pytest.approx(0.25)


def test_the_share_labelled_other_is_reported():
  params, labels = _two_modality_problem()
  sizes = {}
  for name, label in labels.items():  # by hand
    sizes[label] = sizes.get(label, 0) + int(np.prod(SHAPES[name]))
  assert gml_jax.group_sizes(params, labels) == sizes
  total = sum(sizes.values())
  state = gml_jax.balanced_multimodal(optax.sgd(0.1), labels).init(params)
  warnings = gml_jax.speed_warnings(state, params, labels)
  assert (f"7 of {total} parameters ({7 / total:.1%}) are labelled 'other': no speed measures "
          "them, and update='branch' re-balancing steps freeze them.") in warnings
  no_other = {k: v for k, v in labels.items() if v != "other"}
  assert not any("'other'" in w for w in gml_jax.speed_warnings(
      state, {k: params[k] for k in no_other}, no_other))


def test_a_state_restored_without_its_types_is_named():
  import flax.serialization

  params, labels = _two_modality_problem()
  tx = gml_jax.balanced_multimodal(optax.adam(0.1), labels)
  state = tx.init(params)
  restored = flax.serialization.msgpack_restore(flax.serialization.to_bytes(state))
  with pytest.raises(ValueError, match=r"found 0\. It holds a BalanceState's fields as a plain "
                                       r"dict.*restored without a target.*from_state_dict"):
    gml_jax.balance_state(restored)
  typed = flax.serialization.from_state_dict(state, restored)  # the fix the message names
  assert int(gml_jax.balance_state(typed).target) == -1


def _lead_by_hand(speeds):
  """Leader and margin per step with plain loops (independent of describe_speeds)."""
  leaders, margins = [], []
  for row in speeds:
    best = max(range(len(row)), key=lambda k: (row[k], -k))
    leaders.append(best)
    margins.append(row[best] - max(row[j] for j in range(len(row)) if j != best))
  return np.array(leaders), np.array(margins)


def test_describe_speeds_of_three_modalities_matches_numpy_by_hand():
  rng = np.random.default_rng(7)
  runs = [rng.normal(size=(40, 3)) * [0.05, 0.05, 0.05] + [0.30, 0.28, 0.10] for _ in range(3)]
  runs[1][5] = np.nan  # an undefined step is left out
  alpha = 0.15
  report = gml_jax.describe_speeds(runs, alpha=alpha)
  for run, got in zip(runs, report["runs"]):
    defined = run[~np.isnan(run).any(axis=1)]
    spread = defined.max(axis=1) - defined.min(axis=1)
    leaders, margins = _lead_by_hand(defined)
    assert got["undefined_steps"] == len(run) - len(defined)
    assert got["mean"] == pytest.approx(spread.mean())
    assert got["share_above_alpha"] == pytest.approx(np.mean(spread > alpha))
    assert got["alpha_for_half"] == pytest.approx(np.median(spread))
    assert got["favoured"] == leaders[-1]
    assert got["lead_agreement"] == pytest.approx(np.mean(leaders == leaders[-1]))
    assert "sign_agreement" not in got  # the spread has no sign
    for k, m in enumerate(got["modalities"]):
      assert m["leads"] == pytest.approx(np.mean(leaders == k))
      assert m["mean_speed"] == pytest.approx(defined[:, k].mean())
      if np.any(leaders == k):
        assert m["margin"] == pytest.approx(margins[leaders == k].mean())
      else:
        assert m["margin"] is None
  favoured = [int(_lead_by_hand(r[~np.isnan(r).any(axis=1)])[0][-1]) for r in runs]
  assert report["favoured"] == favoured and report["stable"] == (len(set(favoured)) == 1)
  assert report["leads"] == pytest.approx([np.mean([np.mean(
      _lead_by_hand(r[~np.isnan(r).any(axis=1)])[0] == k) for r in runs]) for k in range(3)])
  stacked = gml_jax.describe_speeds(np.stack([np.nan_to_num(r, nan=0.2) for r in runs]), alpha)
  assert len(stacked["runs"]) == 3
  with pytest.raises(ValueError, match=r"speeds \[T, N\] with N >= 2.*got shape \(4, 1\)"):
    gml_jax.describe_speeds(np.zeros((4, 1)))


def test_describe_speeds_of_two_modalities_is_unchanged():
  rng = np.random.default_rng(8)
  speeds = rng.normal(size=(30, 2))
  d_speed = speeds[:, 0] - speeds[:, 1]
  from_speeds, from_d = gml_jax.describe_speeds(speeds), gml_jax.describe_speeds(d_speed)
  for key, value in from_d.items():
    assert from_speeds[key] == pytest.approx(value), key
  assert from_d["favoured"] == int(d_speed[-1] < 0)
  assert from_speeds["lead_agreement"] == pytest.approx(from_d["sign_agreement"])
