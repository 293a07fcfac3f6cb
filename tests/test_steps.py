"""The compiled, data-parallel train step: one compilation, frozen state, 8 devices = 1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gml_jax


def _setup(method="guided", update="branch", inner=None, devices=None, **balance):
  model = gml_jax.small_cnn_fusion(num_classes=4, width=4)
  balance = {"alpha": 0.0, "window": 2, "warmup_steps": 1} | balance
  tx = gml_jax.balanced_multimodal(
      inner or optax.sgd(0.05, momentum=0.9), gml_jax.group_labels, method=method,
      update=update, **balance)
  mesh = gml_jax.data_mesh(devices)
  state = gml_jax.create_train_state(model, tx, [jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 3))])
  return model, tx, mesh, gml_jax.replicate(state, mesh)


def _batches(count, size=16, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    label = rng.integers(0, 4, size).astype(np.int32)
    gray = rng.normal(size=(size, 8, 8, 1)).astype(np.float32) + label[:, None, None, None]
    color = rng.normal(size=(size, 8, 8, 3)).astype(np.float32) * 0.1
    color[..., 0] += label[:, None, None]
    out.append({"inputs": (gray, color), "label": label})
  return out


def _train(setup, batches, traces=None):
  model, tx, mesh, state = setup
  plain = gml_jax.make_train_step(model, tx)

  def counted(state, batch):
    if traces is not None:
      traces.append(1)
    return plain(state, batch)

  step = gml_jax.compile_train_step(counted, mesh)
  history = []
  for batch in batches:
    before = jax.device_get(state)
    state, metrics = step(state, gml_jax.shard_batch(batch, mesh))
    history.append((before, jax.device_get(state), jax.device_get(metrics)))
  return history


def test_one_compilation_across_all_modes():
  traces = []
  history = _train(_setup(method="random", seed=1), _batches(12), traces)
  assert {int(m["target"]) for _, _, m in history} == {-1, 0, 1}
  assert len(traces) == 1


def _is_label(labels, name):
  return lambda tree: jax.tree.map(lambda lab: lab == name, labels(tree))


@pytest.mark.parametrize("inner", ["momentum", "adam"])
def test_branch_rebalancing_freezes_everything_but_branch_k(inner):
  opt = optax.sgd(0.05, momentum=0.9) if inner == "momentum" else optax.adam(0.01)
  history = _train(_setup(method="random", inner=opt, seed=1), _batches(10))
  checked = set()
  for before, after, metrics in history:
    k = int(metrics["target"])
    if k < 0:
      continue
    checked.add(k)
    frozen = 0
    for name in ("params", "batch_stats", "fusion_stats"):
      old, new = before.variables[name], after.variables[name]
      labels = gml_jax.group_labels(old)
      for lab, o, n in zip(jax.tree.leaves(labels), jax.tree.leaves(old), jax.tree.leaves(new)):
        assert lab != "other"
        if lab != f"main:{k}":
          frozen += 1
          np.testing.assert_array_equal(o, n, err_msg=f"{name} {lab} moved")
    assert frozen > 0
    # Branch k itself trains: its parameters and BatchNorm statistics move.
    assert not np.array_equal(before.params[f"branches_{k}"]["head"]["kernel"],
                              after.params[f"branches_{k}"]["head"]["kernel"])
    bn_old = jax.tree.leaves(before.model_state["batch_stats"][f"branches_{k}"])
    bn_new = jax.tree.leaves(after.model_state["batch_stats"][f"branches_{k}"])
    assert any(not np.array_equal(o, n) for o, n in zip(bn_old, bn_new))
  assert checked == {0, 1}


def test_all_rebalancing_moves_other_branches_and_their_fusion_means():
  history = _train(_setup(update="all"), _batches(6))
  before, after, metrics = next(h for h in history if int(h[2]["target"]) >= 0)
  k = int(metrics["target"])
  other = 1 - k
  assert not np.array_equal(before.params[f"branches_{other}"]["head"]["kernel"],
                            after.params[f"branches_{other}"]["head"]["kernel"])
  stats_old, stats_new = before.model_state["fusion_stats"], after.model_state["fusion_stats"]
  # The cut branch's running mean holds; the other modality's mean moves.
  np.testing.assert_array_equal(stats_old["fusion_0"][f"cut_{k}"]["running_mean"],
                                stats_new["fusion_0"][f"cut_{k}"]["running_mean"])
  assert not np.array_equal(stats_old["fusion_0"][f"cut_{other}"]["running_mean"],
                            stats_new["fusion_0"][f"cut_{other}"]["running_mean"])
  np.testing.assert_array_equal(before.params["fusion_0"][f"excite_{k}"]["kernel"],
                                after.params["fusion_0"][f"excite_{k}"]["kernel"])


def test_eight_devices_match_one_device():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated devices"
  batches = _batches(8)
  one = _train(_setup(devices=jax.devices()[:1]), batches)
  eight = _train(_setup(), batches)
  for (_, _, m1), (_, _, m8) in zip(one, eight):
    assert int(m1["target"]) == int(m8["target"])
    np.testing.assert_allclose(m1["speeds"], m8["speeds"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  (_, s1, _), (_, s8, _) = one[-1], eight[-1]  # the final states
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), s1, s8)
  assert any(int(m["target"]) >= 0 for _, _, m in one)


def test_step_metrics_are_consistent():
  history = _train(_setup(method="vanilla"), _batches(3))
  _, after, metrics = history[-1]
  assert set(metrics) >= {"loss", "branch_loss", "accuracy", "branch_accuracy", "mu_main",
                          "mu_fusion", "speeds", "d_speed", "target"}
  np.testing.assert_allclose(metrics["loss"], np.sum(metrics["branch_loss"]), rtol=1e-6)
  np.testing.assert_allclose(metrics["speeds"], gml_jax.modality_speeds(after.opt_state))
  assert metrics["d_speed"] == pytest.approx(metrics["speeds"][0] - metrics["speeds"][1])


def test_eval_step_counts_and_masks():
  model, tx, mesh, state = _setup()
  eval_step = gml_jax.compile_eval_step(gml_jax.make_eval_step(model), mesh)
  batch = _batches(1)[0]
  mask = np.ones(16, np.float32)
  mask[-5:] = 0
  full = jax.device_get(eval_step(state, gml_jax.shard_batch(batch, mesh)))
  masked = jax.device_get(eval_step(state, gml_jax.shard_batch(batch | {"mask": mask}, mesh)))
  logits, branch_logits = model.apply(state.variables, batch["inputs"], train=False)
  hits = np.asarray(jnp.argmax(logits, -1) == batch["label"])
  assert full["count"] == 16 and masked["count"] == 11
  assert full["correct"] == hits.sum() and masked["correct"] == hits[:11].sum()
  branch_hits = np.asarray(jnp.argmax(branch_logits, -1) == batch["label"])
  np.testing.assert_array_equal(masked["branch_correct"], branch_hits[:, :11].sum(-1))


def test_uneven_batch_is_refused():
  _, _, mesh, _ = _setup()
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    gml_jax.shard_batch(_batches(1, size=12)[0], mesh)


def test_multi_step_call_equals_single_steps():
  batches = _batches(6, seed=3)
  single = _train(_setup(method="random", seed=1), batches)
  model, tx, mesh, state = _setup(method="random", seed=1)
  multi = gml_jax.parallel.compile_multi_step(
      gml_jax.steps.make_multi_step(gml_jax.make_train_step(model, tx), 3), mesh)
  targets = []
  for chunk in (batches[:3], batches[3:]):
    stacked = gml_jax.parallel.shard_stacked_batches(gml_jax.parallel.stack_batches(chunk), mesh)
    state, metrics = multi(state, stacked)
    targets += np.asarray(metrics["target"]).tolist()
  assert targets == [int(m["target"]) for _, _, m in single]
  assert any(t >= 0 for t in targets)  # re-balancing steps inside the multi-step calls
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(state), single[-1][1])


def test_bfloat16_step_computes_in_bfloat16_and_keeps_state_in_float32():
  model, tx, mesh, state = _setup(method="guided", warmup_steps=0)
  step = gml_jax.make_train_step(model, tx, compute_dtype=jnp.bfloat16)
  batch = gml_jax.shard_batch(_batches(1)[0], mesh)
  jaxpr = str(jax.make_jaxpr(step)(state, batch))
  convs = [line for line in jaxpr.splitlines() if "conv_general_dilated" in line]
  assert convs and all("bf16" in line for line in convs)  # forward and backward convolutions
  new_state, metrics = jax.jit(step)(state, batch)
  for tree in (new_state.params, new_state.model_state, new_state.opt_state):
    dtypes = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}
  for key in ("loss", "speeds", "mu_main", "d_speed"):
    assert metrics[key].dtype == jnp.float32
