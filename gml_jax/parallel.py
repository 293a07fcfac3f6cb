"""Data parallelism: a 1-D ``data`` mesh over the devices, the state replicated on it, the
batch split over it, and the steps compiled for that layout. The steps of
:mod:`gml_jax.steps` and the runner's input pipeline both use it.

Under :func:`compile_train_step` the batch is sharded over every device on the ``data`` axis
and the state is replicated; XLA all-reduces the gradients and BatchNorm sees the global
batch, so every device takes the same balancing decision.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (or the given) devices with the axis ``data``.

  Built with ``Mesh`` directly: ``jax.make_mesh`` defaults to explicit axis types, under
  which Flax steps on a batch-sharded input fail to trace.
  """
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A copy of ``tree`` on every device of ``mesh``.

  Always a copy (never ``tree``'s own buffers): a compiled train step donates the state it
  is given (:func:`compile_train_step`), which deletes the replicated state's buffers but
  leaves ``tree`` usable.
  """
  # A copy first: device_put to several devices may reuse the buffer already on one of them
  # (may_alias=False does not prevent it there).
  copied = jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, tree)
  return jax.device_put(copied, NamedSharding(mesh, PartitionSpec()), may_alias=False)


def _place_batches(tree: Any, mesh: Mesh, batch_axis: int) -> Any:
  """This process's rows of ``tree`` -> global arrays split over ``data`` on ``batch_axis``."""
  size = mesh.shape[DATA_AXIS]
  for leaf in jax.tree.leaves(tree):
    global_size = leaf.shape[batch_axis] * jax.process_count()
    if global_size % size:
      raise ValueError(
          f"Batch size {global_size} is not divisible by the {size} devices of the "
          f"'{DATA_AXIS}' mesh axis; choose a batch size that is a multiple of {size}."
      )
  sharding = batch_sharding(mesh, batch_axis)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """This process's part of a batch -> global arrays split over the ``data`` axis.

  With one process the part is the whole batch; with several, each passes its own rows
  and the global batch is their concatenation in process order.
  """
  return _place_batches(batch, mesh, batch_axis=0)


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Arrays split over ``data`` on ``batch_axis`` (0: batches; 1: stacked batches)."""
  return NamedSharding(mesh, PartitionSpec(*[None] * batch_axis, DATA_AXIS))


def _jit_step(step: Callable, mesh: Mesh, batch_axis: int) -> Callable:
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
      step,
      in_shardings=(replicated, batch_sharding(mesh, batch_axis)),
      out_shardings=(replicated, replicated),
      donate_argnums=0,
  )


def compile_train_step(train_step: Callable, mesh: Mesh) -> Callable:
  """``jax.jit`` of a train step: state replicated (and donated), batch sharded on ``data``.

  The state passed in is donated: its buffers are reused for the new state and deleted,
  so after ``state, metrics = step(state, batch)`` only the returned state may be used
  (reading the old one raises "Array has been deleted"). Keep a copy first if you need it
  (``jax.tree.map(jnp.copy, state)``); the tree given to :func:`replicate` is not
  affected, as it copies.
  """
  return _jit_step(train_step, mesh, batch_axis=0)


def stack_batches(batches: list[dict]) -> dict:
  """Host batches -> one batch tree with a leading step axis (for :func:`make_multi_step`)."""
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def compile_multi_step(multi_step: Callable, mesh: Mesh) -> Callable:
  """``jax.jit`` of a multi-step: state replicated (and donated, as in
  :func:`compile_train_step`: use only the returned state), batches sharded on ``data``
  along their second axis."""
  return _jit_step(multi_step, mesh, batch_axis=1)


def shard_stacked_batches(batches: dict, mesh: Mesh) -> dict:
  """Like :func:`shard_batch` for stacked batches [steps, batch, ...] of this process."""
  return _place_batches(batches, mesh, batch_axis=1)


def compile_eval_step(eval_step: Callable, mesh: Mesh) -> Callable:
  """``jax.jit`` of an eval step: state replicated, batch sharded on ``data``."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
      eval_step, in_shardings=(replicated, batch_sharding(mesh, 0)), out_shardings=replicated
  )
