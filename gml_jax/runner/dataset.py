"""Prepared datasets: the tfds builders of ``data_prep/``, built on first use (array_record,
no TensorFlow) and opened as checked random-access sources; and what each build was made
from, so that a run never trains on other data than its config names.

A build records ``gml_jax_source.json`` in its version folder: the manual files it was built
from (their count, bytes, a digest of names, sizes and times, and a SHA-256 of names and
contents), or ``default`` when the config named none (the builder's own default source,
e.g. the embedded MNIST subset). A later run compares its config's source with the record:
the names, sizes and times first (cheap), the contents when those differ (files copied or
touched), and stops with what differs and how to proceed when the data is not the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from gml_jax.runner import clone, storage
from gml_jax.runner.pipeline import Preprocess
from gml_jax.runner.workdir import atomic_write

RECORD = "gml_jax_source.json"


class DatasetMismatchError(ValueError):
  """The prepared dataset was built from other data than the config names."""


class DatasetIncompleteError(RuntimeError):
  """A dataset folder exists but holds no complete build."""


def _files(manual_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in manual_dir.rglob("*") if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(manual_dir).parts))


def _stat_digest(manual_dir: pathlib.Path, files) -> str:
  h = hashlib.sha256()
  for p in files:
    st = p.stat()
    h.update(f"{p.relative_to(manual_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def content_sha256(manual_dir) -> str:
  """SHA-256 over every file's relative name and bytes (hidden files left out)."""
  manual_dir = pathlib.Path(manual_dir)
  h = hashlib.sha256()
  for p in _files(manual_dir):
    h.update(f"{p.relative_to(manual_dir)}\0{p.stat().st_size}\n".encode())
    with p.open("rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()


def wanted(manual_dir) -> dict:
  """The source a config names: its manual files (count, bytes, stat digest; the content
  hash is computed only when needed), or the builder's default."""
  if not manual_dir:
    return {"source": "default"}
  root = pathlib.Path(manual_dir).expanduser().resolve()
  files = _files(root)
  return {"source": "manual", "manual_dir": str(root), "files": len(files),
          "bytes": sum(p.stat().st_size for p in files), "stat_digest": _stat_digest(root, files)}


def record_for(want: dict) -> dict:
  """The record of a build from ``want`` (adds the content hash of manual files)."""
  if want["source"] == "manual":
    return want | {"sha256": content_sha256(want["manual_dir"])}
  return dict(want)


def read_record(version_dir: storage.Path) -> dict | None:
  path = version_dir / RECORD
  return json.loads(path.read_text()) if path.exists() else None


def write_record(version_dir: pathlib.Path, record: dict) -> None:
  atomic_write(version_dir / RECORD, json.dumps(record, indent=2))


def _describe(record: dict) -> str:
  if record["source"] == "default":
    built_from = record.get("built_from")
    return f"the builder's default source ({built_from})" if built_from else (
        "the builder's default source")
  return (f"the manual files in {record['manual_dir']} ({record['files']} files, "
          f"{record['bytes']:,} bytes)")


def check(version_dir: storage.Path, record: dict | None, want: dict) -> dict:
  """The record of the prepared build in ``version_dir`` if it was built from ``want``;
  else DatasetMismatchError saying what differs and what to do."""
  how = (f"To use the config's data, give another --config.data.data_dir (it is built "
         f"there), or delete {version_dir} to rebuild it here.")
  if record is None:
    raise DatasetMismatchError(
        f"The dataset in {version_dir} has no record of what it was built from (built by an "
        f"older gml_jax?), so it cannot be matched with the config's data. {how}")
  if record["source"] != want["source"]:
    raise DatasetMismatchError(
        f"The dataset in {version_dir} was built from {_describe(record)}, but the config names "
        f"{_describe(want)}. {how}")
  if want["source"] == "default" or record.get("stat_digest") == want["stat_digest"]:
    return record
  if content_sha256(want["manual_dir"]) == record["sha256"]:  # same files, copied or touched
    return record
  raise DatasetMismatchError(
      f"The dataset in {version_dir} was built from {_describe(record)}; the config's manual "
      f"files are other data: {_describe(want)}, different contents (sha256 "
      f"{record['sha256'][:12]} when built). {how}")


def load_builder(data_config):
  """The prepared tfds builder of ``data_config`` (building it if needed), and the record of
  what it was built from.

  ``data_config`` fields: ``name``, ``builder_config``, ``data_dir``, ``manual_dir``
  (optional; when given it must hold the dataset's manual files). A prepared build from
  other data than the config names, or an incomplete one, is refused. With several
  processes, process 0 checks and builds while the others wait. A ``gs://`` data dir is
  built locally and uploaded, and read from a copy on each host (:func:`mirror_dir`).
  """
  module = clone.dataset_package(data_config.name)
  remote = storage.path(data_config.data_dir) if storage.is_remote(data_config.data_dir) else None
  data_dir = str(mirror_dir(remote) if remote else pathlib.Path(data_config.data_dir).expanduser())
  manual_dir = data_config.get("manual_dir") or None
  if manual_dir is not None:
    check = getattr(module, "check_manual_dir", None)
    if check is not None:
      check(manual_dir)
  make = lambda: module.Builder(config=data_config.builder_config,
                                data_dir=data_dir, file_format="array_record")
  error = None
  if jax.process_index() == 0:
    try:
      if remote:
        _prepare_on_bucket(make(), manual_dir, remote)
      else:
        _prepare(make(), manual_dir)
    except Exception as e:  # noqa: BLE001 (every process must learn that the build failed)
      error = e
  if jax.process_count() > 1:  # every process learns whether process 0 could prepare it
    from jax.experimental import multihost_utils

    if multihost_utils.broadcast_one_to_all(np.int32(error is not None)) and error is None:
      error = RuntimeError("Process 0 could not prepare the dataset; its output says why.")
  if error is not None:
    raise error
  if remote and jax.process_index() != 0:  # every host reads its own copy
    version_dir = pathlib.Path(make().data_dir)
    remote_version = bucket_version_dir(remote, version_dir)
    _mirror(remote_version, version_dir, read_record(remote_version))
  builder = make()  # (after the copy: a builder reads its folder when it is made)
  return builder, read_record(pathlib.Path(builder.data_dir))


# --------------------------------------------------------------------------------------
# A data dir on a bucket


def mirror_dir(remote: storage.Path) -> pathlib.Path:
  """The local copy of a ``gs://`` data dir: array_record files are read through local
  file handles, so each host reads a copy in ``<cache>/tfds/<hash of the URL>``."""
  key = hashlib.sha256(str(remote).encode()).hexdigest()[:16]
  return storage.local_cache_dir() / "tfds" / key


def bucket_version_dir(remote: storage.Path, version_dir: pathlib.Path) -> storage.Path:
  """The bucket's folder of which ``version_dir`` (under :func:`mirror_dir`) is the copy."""
  return remote / str(version_dir.relative_to(mirror_dir(remote)))


def _prepare_on_bucket(builder, manual_dir, remote: storage.Path):
  """The build in ``remote`` (the bucket's data dir), checked like a local one and copied
  to this host; when the bucket has none, built here and uploaded."""
  version_dir = pathlib.Path(builder.data_dir)
  remote_version = bucket_version_dir(remote, version_dir)
  record = read_record(remote_version)  # uploaded last: a record means a complete upload
  if record is None:
    if remote_version.exists():
      raise DatasetIncompleteError(
          f"{remote_version} exists but holds no complete build (no {RECORD}: an interrupted "
          "upload?). Delete it and run again to rebuild it.")
    shutil.rmtree(version_dir, ignore_errors=True)  # not what the bucket holds
    _prepare(builder, manual_dir)
    print(f"Uploading {version_dir} to {remote_version} ...")
    files = sorted(p for p in version_dir.rglob("*") if p.is_file() and p.name != RECORD)
    for p in files + [version_dir / RECORD]:
      (remote_version / str(p.relative_to(version_dir))).write_bytes(p.read_bytes())
    return
  check(remote_version, record, wanted(manual_dir))
  _mirror(remote_version, version_dir, record)


def _mirror(remote_version: storage.Path, version_dir: pathlib.Path, record: dict | None):
  """Copies a bucket's build (its ``record``) to ``version_dir`` unless the copy there has
  the same record (the record is copied last: a copy cut short has none, and is made again)."""
  if record is not None and read_record(version_dir) == record:
    return
  shutil.rmtree(version_dir, ignore_errors=True)
  print(f"Copying {remote_version} to {version_dir} ...")
  for p in _files_under(remote_version):
    if p.name != RECORD:
      target = version_dir / str(p.relative_to(remote_version))
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(p.read_bytes())
  write_record(version_dir, record)


def _files_under(folder: storage.Path):
  """Every file below ``folder`` (a bucket has no recursive glob)."""
  for p in sorted(folder.iterdir()):
    if p.is_dir():
      yield from _files_under(p)
    else:
      yield p


def _prepare(builder, manual_dir) -> None:
  import tensorflow_datasets as tfds

  version_dir = pathlib.Path(builder.data_dir)
  want = wanted(manual_dir)
  if builder.is_prepared():
    record = read_record(version_dir)
    built_from = (builder.info.metadata or {}).get("mnist_source")
    if record is None and want["source"] == "default" and built_from in ("tfds", "embedded"):
      record = want | {"built_from": built_from}  # a build older than the records: adopted
      write_record(version_dir, record)
    check(version_dir, record, want)
    return
  if version_dir.exists():
    raise DatasetIncompleteError(
        f"{version_dir} exists but holds no complete build (no dataset_info.json: an "
        f"interrupted or partly deleted build?). Delete it and run again to rebuild it.")
  print(f"Building {builder.name}/{builder.builder_config.name} in {builder.data_dir} ...")
  tfds.disable_progress_bar()
  record = record_for(want)  # hashed before the build reads the files
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  built_from = (builder.info.metadata or {}).get("mnist_source")
  write_record(version_dir, record | ({"built_from": built_from} if built_from else {}))


class DatasetCorruptError(RuntimeError):
  """A prepared dataset file cannot be read."""


class CheckedSource:
  """A random-access data source whose read errors name the dataset files and the fix."""

  def __init__(self, source, split: str, data_dir: str):
    self._source, self._split, self._data_dir = source, split, data_dir

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    try:
      return self._source[index]
    except (RuntimeError, OSError, ValueError) as e:
      raise DatasetCorruptError(
          f"Cannot read example {index} of split '{self._split}' from {self._data_dir}: {e}. "
          f"The prepared files are corrupt or truncated; delete {self._data_dir} and run "
          "again to rebuild them.") from e


# Splits up to this size are read into memory once per run: reading an example back from
# its file costs a decode (~150 µs for a Colored MNIST digit pair), every epoch.
CACHE_BYTES = 256 << 20


class InMemorySource:
  """A split read once: per-feature arrays, indexed like the source they came from."""

  def __init__(self, examples: list[dict]):
    self._arrays = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}
    self._length = len(examples)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    return {k: v[index] for k, v in self._arrays.items()}


def open_splits(builder, cache_bytes: int = CACHE_BYTES) -> dict:
  """Every split of a prepared builder as a checked data source (read into memory when it
  is at most ``cache_bytes``); reads the first and the last example of each, which fails at
  once on a truncated file."""
  sources = {}
  for split, source in builder.as_data_source().items():
    checked = CheckedSource(source, split, str(builder.data_dir))
    first, _ = checked[0], checked[len(checked) - 1]
    size = len(checked) * sum(np.asarray(v).nbytes for v in first.values())
    sources[split] = (InMemorySource([checked[i] for i in range(len(checked))])
                      if size <= cache_bytes else checked)
  return sources


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A prepared dataset: its builder, every split as a checked source, the preprocessing."""

  builder: Any
  sources: dict[str, CheckedSource | InMemorySource]
  prep: Preprocess
  record: dict  # what it was built from

  @property
  def num_classes(self) -> int:
    """The label feature's classes, or the class list a build recorded in its metadata
    (``classes``: Kinetics-Sounds, whose list is known at build time only)."""
    label = self.builder.info.features["label"]
    if hasattr(label, "num_classes"):
      return label.num_classes
    return len(self.builder.info.metadata["classes"])

  @property
  def source_name(self) -> str:
    """What the data was built from (Colored MNIST and mfeat record it; the others are
    manual)."""
    metadata = self.builder.info.metadata or {}
    return metadata.get("mnist_source") or metadata.get("source", "manual")

  def used(self) -> dict:
    """The data a run uses: source, manual files and their hash, examples per split."""
    return {"source": self.source_name, "manual_dir": self.record.get("manual_dir"),
            "sha256": self.record.get("sha256"),
            "examples": {split: len(s) for split, s in self.sources.items()}}

  def example_inputs(self) -> tuple[np.ndarray, ...]:
    """The model inputs of the first training example, with a batch axis of 1."""
    first = self.prep.resize(self.sources["train"][0])
    stacked = {k: np.asarray(first[k])[None] for k in (*self.prep.modalities, "label")}
    return self.prep.batch(stacked)["inputs"]


def open_dataset(data_config) -> Dataset:
  """The dataset of ``config.data``, built first if needed (:func:`load_builder`)."""
  prep = Preprocess.from_config(data_config)
  builder, record = load_builder(data_config)
  return Dataset(builder, open_splits(builder), prep, record)
