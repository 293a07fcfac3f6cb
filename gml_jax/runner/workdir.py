"""A run's workdir: the config guard (same config, same data) and the lock. What a run
writes there: :mod:`~gml_jax.runner.logs`, :mod:`~gml_jax.runner.checkpoints`."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import socket

import jax
import ml_collections
import numpy as np


def check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                         data_used: dict | None = None, write: bool = True) -> None:
  """Refuses a workdir that holds a run of another config, or of the same config on other
  data; else writes config.json, the config with the data actually used under
  ``data_used`` (when ``write``: process 0 only)."""
  path = workdir / "config.json"
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  if data_used is not None:
    current["data_used"] = data_used
  if path.exists():
    saved = json.loads(path.read_text())
    saved_data, current_data = saved.pop("data_used", None), current.pop("data_used", None)
    if saved != current:
      saved, current = _flatten(saved), _flatten(current)
      diff = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
      raise ValueError(
          f"Workdir {workdir} holds a run of another config (differs in: {', '.join(diff)}). "
          "Use a new --workdir, or the same config to resume that run.")
    if None not in (saved_data, current_data) and _data_key(saved_data) != _data_key(
        current_data):
      raise ValueError(
          f"Workdir {workdir} holds a run on other data: it trained on {describe_data(saved_data)},"
          f" this config's data is {describe_data(current_data)}. Use a new --workdir.")
    return
  if write:
    atomic_write(path, json.dumps(current, indent=2, sort_keys=True))


def _data_key(data_used: dict) -> tuple:
  return data_used.get("source"), data_used.get("sha256"), data_used.get("examples")


def describe_data(data_used: dict) -> str:
  """E.g. "the embedded MNIST subset (3600/400/1000/1000 examples)"."""
  counts = "/".join(str(n) for n in (data_used.get("examples") or {}).values())
  what = {"embedded": "the embedded MNIST subset", "tfds": "tfds's prepared mnist"}.get(
      data_used.get("source"),
      f"manual files (sha256 {str(data_used.get('sha256'))[:12]}, from "
      f"{data_used.get('manual_dir')})")
  return f"{what} ({counts} examples)" if counts else what


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def atomic_write(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


# --------------------------------------------------------------------------------------
# The lock


class WorkdirInUseError(RuntimeError):
  """Another run holds the workdir."""


class WorkdirLock:
  """``lock.json`` in the workdir, locked (flock) by the run that uses it; it names the
  holder (host, pid, start time). The operating system releases the lock when its process
  ends, however it ends, so the lock of a killed run is simply taken over. A multi-process
  job holds one lock, taken by process 0 for all."""

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / "lock.json"
    self._file = None

  def acquire(self) -> None:
    error = None
    if jax.process_index() == 0:
      error = self._acquire_here()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
      if refused and error is None:
        error = WorkdirInUseError(f"Workdir {self.path.parent} is in use: process 0 of this "
                                  "job could not lock it (see its output).")
    if error is not None:
      raise error

  def _acquire_here(self) -> WorkdirInUseError | None:
    f = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read()
      f.close()
      return WorkdirInUseError(
          f"Workdir {self.path.parent} is in use by another run ({_holder_text(holder)}); "
          "wait for it to end, or use another --workdir.")
    f.seek(0)
    previous = f.read()
    if previous.strip():
      print(f"Taking over the lock of a run that ended without releasing it "
            f"({_holder_text(previous)}).")
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "started": datetime.datetime.now().isoformat(timespec="seconds")}))
    f.flush()
    self._file = f
    return None

  def release(self) -> None:
    if self._file is not None:
      self._file.truncate(0)  # an empty lock file: released cleanly
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _holder_text(text: str) -> str:
  try:
    h = json.loads(text)
    return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
  except (ValueError, KeyError, TypeError):
    return "holder unknown"
