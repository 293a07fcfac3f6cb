"""The transform in plain Flax models that do not use this library's modules.

These mirror the README's two usage examples (Linen, then NNX with nnx.Optimizer)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gml_jax

# Groups of the user's own modules, read from the top-level module names.
GROUPS = {"audio": "main:0", "audio_head": "main:0", "video": "main:1", "video_head": "main:1",
          "gate_audio": "fusion:0", "gate_video": "fusion:1", "joint": "fusion:shared"}


def labels_of(params):
  return jax.tree_util.tree_map_with_path(lambda path, _: GROUPS[path[0].key], params)


def _data(seed=0, size=32):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, size)
  a = rng.normal(size=(size, 5)).astype(np.float32) + y[:, None]
  v = rng.normal(size=(size, 7)).astype(np.float32) - y[:, None]
  return jnp.asarray(a), jnp.asarray(v), jnp.asarray(y)


def _check_masked_steps(history):
  """In every re-balancing step for k, only parameters labelled main:k moved."""
  steps = 0
  for before, after, target in history:
    if target < 0:
      continue
    steps += 1
    labels = labels_of(before)
    for lab, o, n in zip(jax.tree.leaves(labels), jax.tree.leaves(before), jax.tree.leaves(after)):
      assert np.array_equal(o, n) == (lab != f"main:{target}"), (lab, target)
  assert steps > 0


class LinenModel(nn.Module):
  """Two encoders, a sigmoid gate from a joint layer, two heads; ``cut`` blocks the gate."""

  @nn.compact
  def __call__(self, a, v, cut):
    ha, hv = nn.relu(nn.Dense(8, name="audio")(a)), nn.relu(nn.Dense(8, name="video")(v))
    joint = nn.relu(nn.Dense(4, name="joint")(jnp.concatenate([ha, hv], -1)))
    ga = jnp.where(cut == 0, 1.0, nn.sigmoid(nn.Dense(8, name="gate_audio")(joint)))
    gv = jnp.where(cut == 1, 1.0, nn.sigmoid(nn.Dense(8, name="gate_video")(joint)))
    return nn.Dense(3, name="audio_head")(ha * ga), nn.Dense(3, name="video_head")(hv * gv)


def test_linen_model():
  a, v, y = _data()
  model = LinenModel()
  params = model.init(jax.random.key(0), a, v, -1)["params"]
  tx = gml_jax.balanced_multimodal(optax.adam(1e-2), labels_of, method="random", seed=2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    cut = gml_jax.rebalance_target(opt_state)

    def loss_fn(p):
      la, lv = model.apply({"params": p}, a, v, cut)
      ce = optax.softmax_cross_entropy_with_integer_labels
      return ce(la, y).mean() + ce(lv, y).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  history = []
  for _ in range(12):
    target = int(gml_jax.rebalance_target(opt_state))
    new_params, opt_state = step(params, opt_state)
    history.append((params, new_params, target))
    params = new_params
  _check_masked_steps(history)
  assert np.all(np.isfinite(gml_jax.modality_speeds(opt_state)))


class NNXModel(nnx.Module):
  def __init__(self, rngs):
    self.audio, self.video = nnx.Linear(5, 8, rngs=rngs), nnx.Linear(7, 8, rngs=rngs)
    self.joint = nnx.Linear(16, 4, rngs=rngs)
    self.gate_audio, self.gate_video = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(4, 8, rngs=rngs)
    self.audio_head, self.video_head = nnx.Linear(8, 3, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, a, v, cut):
    ha, hv = nnx.relu(self.audio(a)), nnx.relu(self.video(v))
    joint = nnx.relu(self.joint(jnp.concatenate([ha, hv], -1)))
    ga = jnp.where(cut == 0, 1.0, nnx.sigmoid(self.gate_audio(joint)))
    gv = jnp.where(cut == 1, 1.0, nnx.sigmoid(self.gate_video(joint)))
    return self.audio_head(ha * ga), self.video_head(hv * gv)


def test_nnx_model_with_nnx_optimizer():
  a, v, y = _data(1)
  model = NNXModel(nnx.Rngs(0))
  tx = gml_jax.balanced_multimodal(optax.sgd(0.05, momentum=0.9), labels_of, method="random",
                                   seed=5)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    cut = gml_jax.rebalance_target(optimizer.opt_state)

    def loss_fn(model):
      la, lv = model(a, v, cut)
      ce = optax.softmax_cross_entropy_with_integer_labels
      return ce(la, y).mean() + ce(lv, y).mean()

    optimizer.update(model, nnx.grad(loss_fn)(model))

  params = lambda: jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  history = []
  for _ in range(12):
    target = int(gml_jax.rebalance_target(optimizer.opt_state))
    before = params()
    step(model, optimizer)
    history.append((before, params(), target))
  _check_masked_steps(history)
  assert gml_jax.modality_speeds(optimizer.opt_state).shape == (2,)
