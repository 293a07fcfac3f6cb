"""Preprocessing: resizing, ImageNet normalization, seeded horizontal flips."""

import numpy as np

from gml_jax.runner import pipeline
from gml_jax.runner.pipeline import Preprocess


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
