"""Input pipeline: examples of a prepared dataset (:mod:`gml_jax.runner.dataset`) read with
grain, preprocessed, batched and placed on the mesh.

Sources are random access, so a run can resume at any step: the order of epoch e is a
fixed function of (seed, e), and step s reads batch s mod steps_per_epoch of epoch
s // steps_per_epoch.

Every process reads only its shard of a split (``jax.process_index()``). Batches leave the
pipeline as global arrays already placed on the mesh (:func:`gml_jax.parallel.shard_batch`
assembles them across processes), a few calls ahead of the step that uses them.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from gml_jax.parallel import batch_sharding, shard_batch, shard_stacked_batches, stack_batches
from gml_jax.runner import clone

NORMALIZATIONS = ("none", "imagenet")  # data.normalize
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How examples become model inputs.

  Attributes:
    modalities: the feature of each modality, in order.
    image_size: resize images (uint8 features) to this square size (0: keep the stored size).
    normalize: "none" (pixels / 255) or "imagenet" (then ImageNet mean and std); images
      (uint8 features) only.
    hflip: random horizontal flips in training (one draw per example, every image modality).
  """

  modalities: tuple[str, ...]
  image_size: int = 0
  normalize: str = "none"
  hflip: bool = False

  @classmethod
  def from_config(cls, data_config) -> "Preprocess":
    """The preprocessing of ``config.data``; its modalities are those of
    ``data.modalities`` (all of the dataset's when the field is absent), whose features
    the dataset's package declares (``data_prep/<name>/``: ``MODALITIES``)."""
    features = clone.dataset_modalities(data_config.name)
    chosen = data_config.get("modalities") or range(len(features))
    return cls(tuple(features[i] for i in chosen), data_config.image_size,
               data_config.normalize, data_config.hflip)

  def resize(self, example: dict) -> dict:
    if not self.image_size:
      return example
    out = dict(example)
    for m in self.modalities:
      image = np.asarray(example[m])
      if image.dtype == np.uint8 and image.shape[:2] != (self.image_size, self.image_size):
        from PIL import Image

        resized = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).resize(
            (self.image_size, self.image_size), Image.BILINEAR)
        out[m] = np.asarray(resized).reshape(self.image_size, self.image_size, -1)
    return out

  def flip(self, example: dict, rng: np.random.Generator) -> dict:
    if not (self.hflip and rng.random() < 0.5):
      return example
    # The width axis is the one before the channels, for images and videos alike; only
    # images (uint8) flip: a spectrogram's axis there is time, a feature vector has none.
    return example | {m: np.flip(np.asarray(example[m]), axis=-2) for m in self.modalities
                      if np.asarray(example[m]).dtype == np.uint8}

  def batch(self, examples: dict) -> dict:
    """Stacked examples -> ``{"inputs": (m_0, m_1, ...), "label"}`` as float32 / int32.

    Images (uint8) are scaled to [0, 1] (then ImageNet-normalised where ``normalize`` says
    so); float features (spectrograms, feature vectors) are model inputs as stored."""
    return {"inputs": tuple(self._input(examples[m]) for m in self.modalities),
            "label": np.asarray(examples["label"], np.int32)}

  def _input(self, values) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype != np.uint8:
      return values.astype(np.float32)
    x = values.astype(np.float32) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD if self.normalize == "imagenet" else x


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def local_batch_size(global_batch_size: int) -> int:
  """This process's share of a global batch (the runner checks that it divides evenly)."""
  return global_batch_size // jax.process_count()


def steps_per_epoch(source, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder of an epoch is dropped in training)."""
  steps = len(source) // jax.process_count() // local_batch_size(global_batch_size)
  if steps == 0:
    raise ValueError(f"The training split ({len(source)} examples) is smaller than one batch "
                     f"of {global_batch_size}.")
  return steps


# Threads reading and preprocessing examples (``make bench`` measures the rate per thread).
READ_THREADS = 2


def _read_options(num_threads: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8)


def host_train_batches(source, prep: Preprocess, global_batch_size: int, seed: int,
                       epoch: int, start: int = 0,
                       num_threads: int = READ_THREADS) -> Iterator[dict]:
  """This process's batches of epoch ``epoch`` as NumPy arrays, from batch ``start`` on
  (random flips are drawn per example from (seed, epoch), so a resumed epoch flips the same
  way)."""
  epoch_seed = _epoch_seed(seed, epoch)
  ds = grain.MapDataset.source(source).shuffle(seed=epoch_seed)
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.map(prep.resize).random_map(prep.flip, seed=epoch_seed)
  ds = ds.batch(local_batch_size(global_batch_size), drop_remainder=True)
  ds = ds[start : steps_per_epoch(source, global_batch_size)]
  ds = ds.map(prep.batch)
  return iter(ds.to_iter_dataset(_read_options(num_threads)))


def eval_batch_count(num_examples: int, global_batch_size: int) -> int:
  """Batches every process reads of a split: enough for the largest process shard."""
  largest = -(-num_examples // jax.process_count())
  return -(-largest // local_batch_size(global_batch_size))


def host_eval_batches(source, prep: Preprocess, global_batch_size: int,
                      num_threads: int = READ_THREADS) -> Iterator[dict]:
  """Every example of the split exactly once over all processes, as NumPy arrays.

  Process p reads examples p, p + P, p + 2P, ...; every process yields the same number of
  batches (that of the largest shard), padded where needed and carrying ``mask`` (0 on
  padding), so that batches line up across processes.
  """
  local = local_batch_size(global_batch_size)
  shard = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
  padded = eval_batch_count(len(source), global_batch_size) * local

  def example(i: int) -> dict:  # past the shard's end: its last example again, masked out
    e = prep.resize(shard[min(i, len(shard) - 1)])
    return {k: e[k] for k in prep.modalities + ("label",)} | {
        "mask": np.float32(i < len(shard))}

  ds = grain.MapDataset.range(padded).map(example).batch(local)
  ds = ds.map(lambda b: prep.batch(b) | {"mask": b["mask"]})
  return iter(ds.to_iter_dataset(_read_options(num_threads)))


def prefetch(batches: Iterable, place: Callable, ahead: int = 2) -> Iterator:
  """``place(batch)`` for every batch, ``ahead`` batches in advance: with JAX's
  asynchronous dispatch the transfers overlap the steps already running."""
  queue = collections.deque()
  for batch in batches:
    queue.append(place(batch))
    if len(queue) > ahead:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def batch_spec(example_inputs, global_batch_size: int, mesh: Mesh,
               steps: int | None = None) -> dict:
  """Shapes, dtypes and shardings of a training batch (``steps`` stacked ones for a
  multi-step call) like ``example_inputs`` (one example's inputs, batch axis first), to
  compile the steps ahead of the first batch."""
  lead = (steps,) if steps else ()
  sharding = batch_sharding(mesh, batch_axis=len(lead))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(lead + (global_batch_size,) + shape, dtype,
                                                   sharding=sharding)
  return {"inputs": tuple(spec(x.shape[1:], x.dtype) for x in example_inputs),
          "label": spec((), jnp.int32)}


def call_plan(step: int, k: int, spe: int, checkpoint_every: int, stop_after) -> list[int]:
  """The sizes of the train-step calls from ``step`` to the end of its epoch: ``k`` steps
  a call, but single steps up to an epoch end, a checkpoint or a requested stop that a
  call of ``k`` would cross."""
  plan = []
  while step % spe or not plan:
    limits = [k, spe - step % spe]
    if checkpoint_every:
      limits.append(checkpoint_every - step % checkpoint_every)
    if stop_after is not None:
      limits.append(max(stop_after - step, 1))
    size = k if min(limits) == k else 1
    plan.append(size)
    step += size
  return plan


def train_batches(source, prep: Preprocess, global_batch_size: int, seed: int, epoch: int,
                  start: int, call_sizes: Sequence[int], mesh: Mesh) -> Iterator[tuple]:
  """(size, batch) per train-step call of epoch ``epoch`` from batch ``start`` on, placed on
  ``mesh``: one batch for a call of size 1, ``size`` stacked batches (leading step axis)
  for a multi-step call."""
  host = host_train_batches(source, prep, global_batch_size, seed, epoch, start)

  def calls():
    for size in call_sizes:
      chunk = [next(host) for _ in range(size)]
      yield size, (chunk[0] if size == 1 else stack_batches(chunk))

  def place(call):
    size, batch = call
    return size, (shard_batch(batch, mesh) if size == 1 else shard_stacked_batches(batch, mesh))

  return prefetch(calls(), place)


def eval_batches(source, prep: Preprocess, global_batch_size: int, mesh: Mesh,
                 progress: str | None = None) -> Iterator[dict]:
  """:func:`host_eval_batches` placed on ``mesh``, prefetched; with a progress bar named
  ``progress`` (on process 0) when given."""
  batches = prefetch(host_eval_batches(source, prep, global_batch_size),
                     lambda batch: shard_batch(batch, mesh))
  if progress is None:
    return batches
  return iter(tqdm(batches, total=eval_batch_count(len(source), global_batch_size),
                   desc=progress, unit="batch", leave=False, disable=jax.process_index() != 0))
