"""The Colored MNIST builder on its dummy data (real digits, MNIST IDX layout)."""

import gzip
import pathlib
import shutil

import numpy as np
import pytest
from run_helpers import build_dataset

from data_prep.colored_mnist import Builder, colored_mnist_dataset_builder, mnist_sources

DUMMY = pathlib.Path(__file__).resolve().parents[1] / "data_prep" / "colored_mnist" / "dummy_data"
COLORS = colored_mnist_dataset_builder.CLASS_COLORS


def build(data_dir, manual_dir=DUMMY, config="var_0.02"):
  return build_dataset(Builder, config, data_dir, manual_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return build(tmp_path_factory.mktemp("tfds"))


def _all(source):
  examples = [source[i] for i in range(len(source))]
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def _stroke_color(split):
  """Measured stroke color of each example: colored / gray on bright stroke pixels."""
  gray = split["gray"].astype(np.float64)
  ratio = split["colored"] / np.maximum(gray, 1)
  on = np.broadcast_to(gray > 100, ratio.shape)
  return np.nanmean(np.where(on, ratio, np.nan).reshape(len(gray), -1, 3), axis=1)


def test_splits_sizes_and_source(built):
  # 210 training digits: 10% held out for validation; 99 test digits, colored twice.
  assert {k: v.num_examples for k, v in built.info.splits.items()} == {
      "train": 189, "validation": 21, "test": 99, "test_biased": 99}
  assert built.info.metadata["mnist_source"] == "idx"


def test_color_predicts_label_only_in_biased_splits(built):
  sources = built.as_data_source()
  agreement = {}
  for name in ("train", "validation", "test", "test_biased"):
    split = _all(sources[name])
    measured = _stroke_color(split)
    nearest = np.linalg.norm(measured[:, None] - COLORS[None], axis=-1).argmin(-1)
    # Jitter of variance 0.02 blurs neighbouring colors (red/orange/brown) a little.
    assert np.mean(nearest == split["color"]) > 0.75  # the recorded color is the one drawn
    agreement[name] = np.mean(nearest == split["label"])
  assert min(agreement["train"], agreement["validation"], agreement["test_biased"]) > 0.75
  assert agreement["test"] < 0.3  # chance: 0.1


def test_gray_and_colored_are_the_same_digit(built):
  sources = built.as_data_source()
  idx_images = mnist_sources.read_idx(DUMMY / "t10k-images-idx3-ubyte.gz")
  for name in ("train", "test"):
    split = _all(sources[name])
    gray = split["gray"][..., 0].astype(np.float64)
    # Strokes of the colored image lie exactly where the gray digit has ink.
    assert np.all((split["colored"].max(-1) > 0) <= (gray > 0))
    expected = np.round(gray[..., None] * (split["colored"].max((1, 2)) / 255.0)[:, None, None])
    assert np.abs(split["colored"].max(-1) - expected.max(-1)).max() <= 2
  test = _all(sources["test"])
  # Test digits are the IDX digits themselves (in a shuffled order).
  assert sorted(map(bytes, test["gray"][..., 0])) == sorted(map(bytes, idx_images))


def test_deterministic(built, tmp_path):
  again = build(tmp_path)
  a, b = _all(built.as_data_source()["test"]), _all(again.as_data_source()["test"])
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_jitter_variance_is_the_config(tmp_path):
  for config, var in (("var_0.02", 0.02), ("var_0.05", 0.05)):
    split = _all(build(tmp_path / config, config=config).as_data_source()["train"])
    residual = _stroke_color(split) - COLORS[split["label"]]
    inside = (COLORS[split["label"]] > 0.2) & (COLORS[split["label"]] < 0.8)  # not clipped
    assert np.var(residual[inside]) == pytest.approx(var, rel=0.35)


def test_missing_and_malformed_sources(tmp_path):
  partial = tmp_path / "partial"
  partial.mkdir()
  shutil.copy(DUMMY / "train-images-idx3-ubyte.gz", partial)
  with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
    mnist_sources.load_idx(partial)
  with pytest.raises(FileNotFoundError, match="must hold the four MNIST IDX files"):
    mnist_sources.check_manual_dir(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="No MNIST IDX files found"):
    mnist_sources.check_manual_dir(tmp_path / "partial" / "..")

  truncated = tmp_path / "truncated"
  shutil.copytree(DUMMY, truncated)
  data = gzip.decompress((DUMMY / "train-images-idx3-ubyte.gz").read_bytes())
  (truncated / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:-100]))
  with pytest.raises(ValueError, match="truncated or malformed"):
    mnist_sources.load_idx(truncated)
  (truncated / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
  with pytest.raises(ValueError, match="Cannot read MNIST IDX file"):
    mnist_sources.load_idx(truncated)


def test_embedded_default_is_real_mnist():
  train_x, train_y, test_x, test_y = mnist_sources.load_embedded()
  assert train_x.shape == (4000, 28, 28) and test_x.shape == (1000, 28, 28)
  assert set(np.unique(train_y)) == set(range(10))
  # Real digits: ink in the centre, none in the corners.
  assert train_x[:, 10:18, 10:18].mean() > 5 * train_x[:, :4, :4].mean() + 1
