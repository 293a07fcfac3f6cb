"""Preprocessing (resizing, ImageNet normalization, seeded horizontal flips) and batches
placed on the mesh in train-step calls."""

import jax
import numpy as np

import gml_jax
from gml_jax.runner import pipeline
from gml_jax.runner.pipeline import Preprocess, call_plan


class Source:
  """Examples whose two views are left-right ramps (so a flip is visible)."""

  def __len__(self):
    return 40

  def __getitem__(self, i):
    ramp = np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 3))
    return {"a": ramp, "b": ramp.copy(), "label": i % 4}


def test_imagenet_normalization_and_resize():
  prep = Preprocess(("a", "b"), image_size=4, normalize="imagenet")
  example = prep.resize(Source()[0])
  assert example["a"].shape == (4, 4, 3)
  batch = prep.batch({k: np.stack([example[k]]) for k in ("a", "b", "label")})
  expected = (example["a"] / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225])
  np.testing.assert_allclose(batch["inputs"][0][0], expected, rtol=1e-5)
  assert batch["label"].dtype == np.int32


def _flips(seed, epoch):
  prep = Preprocess(("a", "b"), hflip=True)
  flipped = []
  for batch in pipeline.host_train_batches(Source(), prep, 8, seed, epoch):
    for a, b in zip(*batch["inputs"]):
      assert np.array_equal(a, b)  # one draw per example, for both modalities
      flipped.append(bool(a[0, 0, 0] > a[0, -1, 0]))
  return flipped


def test_flips_are_seeded_per_epoch_and_about_half():
  first = _flips(seed=1, epoch=0)
  assert first == _flips(seed=1, epoch=0)  # a resumed epoch flips the same way
  assert first != _flips(seed=1, epoch=1)
  assert 8 <= sum(first) <= 32
  assert not any(_flips_without())


def _flips_without():
  prep = Preprocess(("a", "b"), hflip=False)
  return [bool(a[0, 0, 0] > a[0, -1, 0])
          for batch in pipeline.host_train_batches(Source(), prep, 8, 1, 0)
          for a in batch["inputs"][0]]


def test_call_plan_takes_k_steps_a_call_and_single_steps_up_to_a_boundary():
  # (step, k, steps per epoch, checkpoint every, stop after) -> call sizes to the epoch end
  assert call_plan(0, 4, 10, 0, None) == [4, 4, 1, 1]
  assert call_plan(3, 4, 10, 0, None) == [4, 1, 1, 1]
  assert call_plan(0, 4, 10, 6, None) == [4, 1, 1, 4]
  assert call_plan(0, 4, 10, 0, 5)[:2] == [4, 1]
  assert call_plan(20, 1, 10, 0, None) == [1] * 10


def test_train_batches_arrive_placed_on_the_mesh_in_calls():
  mesh = gml_jax.data_mesh()
  prep = Preprocess(("a", "b"), hflip=True)
  host = list(pipeline.host_train_batches(Source(), prep, 8, 1, 0))  # 5 batches of 8
  calls = list(pipeline.train_batches(Source(), prep, 8, 1, 0, 1, [2, 1, 1], mesh))
  assert [size for size, _ in calls] == [2, 1, 1]
  expected = [gml_jax.parallel.stack_batches(host[1:3]), host[3], host[4]]
  for (size, placed), want in zip(calls, expected):
    for got, x in zip(jax.tree.leaves(placed), jax.tree.leaves(want)):
      assert isinstance(got, jax.Array) and len(got.sharding.device_set) == 8
      assert got.sharding.spec[size > 1] == "data"  # the batch axis is split over devices
      np.testing.assert_array_equal(np.asarray(got), x)


def test_eval_batches_arrive_placed_and_padded():
  mesh = gml_jax.data_mesh()
  batches = list(pipeline.eval_batches(Source(), Preprocess(("a", "b")), 16, mesh))
  assert len(batches) == 3  # 40 examples: 16 + 16 + 8 real, 8 padding
  assert all(b["label"].sharding.spec[0] == "data" for b in batches)
  np.testing.assert_array_equal(np.concatenate([np.asarray(b["mask"]) for b in batches]),
                                [1] * 40 + [0] * 8)
  labels = np.concatenate([np.asarray(b["label"]) for b in batches])[:40]
  np.testing.assert_array_equal(labels, np.arange(40) % 4)


def test_float_features_pass_as_stored_and_only_images_flip():
  # A spectrogram or feature vector (float32) is a model input as stored: not scaled by
  # 1/255, not ImageNet-normalised, not resized, not flipped; the uint8 image beside it is.
  ramp = np.tile(np.arange(4, dtype=np.uint8)[None, :, None] * 60, (4, 1, 3))
  spectrogram = np.arange(12, dtype=np.float32).reshape(3, 4, 1) - 5
  example = {"image": ramp, "spec": spectrogram, "label": 1}
  prep = Preprocess(("image", "spec"), image_size=2, normalize="imagenet", hflip=True)
  resized = prep.resize(example)
  assert resized["image"].shape == (2, 2, 3) and resized["spec"] is spectrogram
  draws = [prep.flip(example, np.random.default_rng(s)) for s in range(20)]
  assert any(np.array_equal(d["image"], ramp[:, ::-1]) for d in draws)
  assert all(d["spec"] is spectrogram for d in draws)
  batch = prep.batch({k: np.stack([v]) for k, v in example.items()})
  np.testing.assert_array_equal(batch["inputs"][1][0], spectrogram)
  expected = (ramp / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(batch["inputs"][0][0], expected, rtol=1e-5)
