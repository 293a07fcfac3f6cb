"""Datasets (gml_jax/runner/dataset.py): a run trains on what its config names, or stops
saying what differs; corrupt, incomplete or out-of-range data is named; small splits read
into memory equal the files."""

import gzip
import hashlib
import json
import shutil

import numpy as np
import pytest
from run_helpers import DUMMY, tiny_config

from data_prep.colored_mnist import mnist_sources
from gml_jax.runner import dataset, trainer


def _write_idx(directory, train_count, test_count, label_fix=None):
  """A smaller MNIST-format set from the dummy digits (other data than the dummy set)."""
  directory.mkdir(parents=True)
  for key, name in mnist_sources.IDX_FILES.items():
    data = mnist_sources.read_idx(DUMMY / f"{name}.gz")
    data = data[: train_count if key.startswith("train") else test_count].copy()
    if label_fix and key == "train_labels":
      data[label_fix[0]] = label_fix[1]
    header = bytes([0, 0, 8, data.ndim]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
    with gzip.open(directory / f"{name}.gz", "wb") as f:
      f.write(header + data.tobytes())
  return directory


def _config(data_dir, manual_dir):
  config = tiny_config("guided", data_dir)
  config.data.manual_dir = str(manual_dir) if manual_dir else ""
  return config


def test_corrupt_dataset_files_are_named(data_dir, tmp_path):
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir, copy)
  (train_file,) = copy.glob("colored_mnist/*/*/*-train.array_record*")
  data = train_file.read_bytes()
  train_file.write_bytes(data[: len(data) // 2])
  config = tiny_config("guided", copy)
  with pytest.raises(dataset.DatasetCorruptError,
                     match=r"(?s)split 'train'.*corrupt or truncated; delete"):
    trainer.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()


def test_other_manual_files_than_the_built_ones_are_refused(data_dir, tmp_path):
  other = _write_idx(tmp_path / "other", 150, 80)
  with pytest.raises(dataset.DatasetMismatchError,
                     match=r"(?s)manual files in .*dummy_data \(4 files.*other data: the manual "
                           r"files in .*other \(4 files.*another --config.data.data_dir"):
    trainer.train_and_evaluate(_config(data_dir, other), tmp_path / "run")
  # The reverse: no manual files named, a build from manual files prepared.
  with pytest.raises(dataset.DatasetMismatchError,
                     match="built from the manual files in .* but the config names the "
                           "builder's default source"):
    trainer.train_and_evaluate(_config(data_dir, None), tmp_path / "run")
  assert not (tmp_path / "run").exists()
  # The same files elsewhere (copied: new times) are the same data.
  copy = shutil.copytree(DUMMY, tmp_path / "copy")
  for f in copy.iterdir():
    f.touch()
  _, record = dataset.load_builder(_config(data_dir, copy).data)
  assert record["manual_dir"] == str(DUMMY.resolve())


def test_changed_manual_files_are_read_and_refused(tmp_path):
  manual = _write_idx(tmp_path / "mnist", 120, 40)
  config = _config(tmp_path / "tfds", manual)
  dataset.load_builder(config.data)
  (manual / "t10k-labels-idx1-ubyte.gz").write_bytes(b"corrupt")  # same name, other bytes
  with pytest.raises(dataset.DatasetMismatchError, match=r"different contents \(sha256"):
    dataset.load_builder(config.data)


def test_run_records_the_data_it_used(data_dir, tmp_path):
  summary = trainer.train_and_evaluate(_config(data_dir, DUMMY), tmp_path)
  used = json.loads((tmp_path / "config.json").read_text())["data_used"]
  assert summary["data"] == used
  assert used["source"] == "idx" and used["manual_dir"] == str(DUMMY.resolve())
  assert used["examples"] == {"train": 189, "validation": 21, "test": 99, "test_biased": 99}
  digest = hashlib.sha256()
  for f in sorted(DUMMY.iterdir()):
    digest.update(f"{f.name}\0{f.stat().st_size}\n".encode() + f.read_bytes())
  assert used["sha256"] == digest.hexdigest()


def test_incomplete_prepared_folder_is_reported(data_dir, tmp_path):
  copy = shutil.copytree(data_dir, tmp_path / "tfds")
  (info,) = copy.glob("colored_mnist/*/*/dataset_info.json")
  info.unlink()
  with pytest.raises(dataset.DatasetIncompleteError,
                     match=r"holds no complete build \(no dataset_info.json.*Delete it"):
    trainer.train_and_evaluate(_config(copy, DUMMY), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_label_outside_the_digits_is_named(tmp_path):
  manual = _write_idx(tmp_path / "mnist", 120, 40, label_fix=(7, 12))
  with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: label 12 at index 7 "
                                       r"\(1 labels in all\) is not a digit; expected labels 0-9"):
    dataset.load_builder(_config(tmp_path / "tfds", manual).data)


def test_small_splits_read_into_memory_equal_the_files(data_dir):
  builder, _ = dataset.load_builder(_config(data_dir, DUMMY).data)
  cached, direct = dataset.open_splits(builder), dataset.open_splits(builder, cache_bytes=0)
  assert isinstance(cached["train"], dataset.InMemorySource)
  assert isinstance(direct["train"], dataset.CheckedSource)
  for split in direct:
    assert len(cached[split]) == len(direct[split])
    for i in range(len(direct[split])):
      a, b = cached[split][i], direct[split][i]
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
