"""A run's workdir: the config guard (same config, same data) and the lock. What a run
writes there: :mod:`~gml_jax.runner.logs`, :mod:`~gml_jax.runner.checkpoints`."""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import pathlib
import socket

import jax
import ml_collections
import numpy as np

from gml_jax.runner.failure import read_json, shorten


def check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                         data_used: dict | None = None) -> None:
  """Refuses a workdir whose config.json holds a run of another config, or of the same
  config on other data (:func:`write_config` writes it; the checkpoints carry a digest of
  the config too, checked on restore, so a missing or replaced config.json cannot make a
  run resume another's checkpoint)."""
  path = workdir / "config.json"
  current = resolved_config(config, data_used)
  if path.exists() or path.is_symlink():
    refuse_link(path)
    saved = read_json(path)
    if not isinstance(saved, dict):
      raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not a config; it was "
                       "edited. Restore it, or use a new --workdir.")
    saved_data, current_data = saved.pop("data_used", None), current.pop("data_used", None)
    if saved != current:
      saved, current = _flatten(saved), _flatten(current)
      diff = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
      raise ValueError(
          f"Workdir {workdir} holds a run of another config (differs in: "
          f"{shorten(', '.join(diff))}). Use a new --workdir, or the same config to resume "
          "that run.")
    if None not in (saved_data, current_data) and _data_key(saved_data) != _data_key(
        current_data):
      raise ValueError(
          f"Workdir {workdir} holds a run on other data: it trained on {describe_data(saved_data)},"
          f" this config's data is {describe_data(current_data)}. Use a new --workdir.")


def resolved_config(config: ml_collections.ConfigDict, data_used: dict | None) -> dict:
  """The config as config.json holds it: every field, and the data used."""
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  if data_used is not None:
    current["data_used"] = data_used
  return current


def config_digest(config: ml_collections.ConfigDict, data_used: dict | None) -> str:
  """SHA-256 of the config and the data it trains on: saved with every checkpoint, so that a
  checkpoint is never resumed by another config, whatever config.json says."""
  current = resolved_config(config, None)
  key = {"config": current, "data": _data_key(data_used) if data_used else None}
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                 data_used: dict | None) -> None:
  """Writes config.json (when there is none: the guard has compared an existing one)."""
  if not (workdir / "config.json").exists():
    atomic_write(workdir / "config.json",
                 json.dumps(resolved_config(config, data_used), indent=2, sort_keys=True))


def _data_key(data_used: dict) -> tuple:
  return data_used.get("source"), data_used.get("sha256"), data_used.get("examples")


def describe_data(data_used: dict) -> str:
  """E.g. "the embedded MNIST subset (3600/400/1000/1000 examples)"."""
  counts = "/".join(str(n) for n in (data_used.get("examples") or {}).values())
  what = {"embedded": "the embedded MNIST subset", "tfds": "tfds's prepared mnist"}.get(
      data_used.get("source"),
      f"manual files (sha256 {str(data_used.get('sha256'))[:12]}, from "
      f"{shorten(data_used.get('manual_dir'))})")
  return f"{what} ({counts} examples)" if counts else what


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def refuse_link(path: pathlib.Path) -> None:
  """A ValueError if ``path`` is a symbolic link: the runner never reads or writes a
  workdir's files through links (that could reach and overwrite files outside it)."""
  if path.is_symlink():
    raise ValueError(f"{path} is a symbolic link (to {shorten(os.readlink(path))}); the runner "
                     "does not write through links. Remove it (or use a new --workdir).")


def open_no_follow(path: pathlib.Path, mode: str = "a"):
  """``open(path, mode)`` for writing ("w" or "a"), refusing a symbolic link."""
  refuse_link(path)
  flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if mode == "a" else os.O_TRUNC)
  return os.fdopen(os.open(path, flags, 0o644), mode, encoding="utf-8", newline="")


def atomic_write(path: pathlib.Path, text: str) -> None:
  """Writes ``path`` whole or not at all (a temporary file renamed over it), through no
  symbolic link."""
  refuse_link(path)
  tmp = path.with_name(path.name + ".tmp")
  if tmp.is_symlink():  # a leftover link in our temporary's place: remove it, not its target
    tmp.unlink()
  with open_no_follow(tmp, "w") as f:
    f.write(text)
  tmp.replace(path)


# --------------------------------------------------------------------------------------
# The lock


class WorkdirInUseError(RuntimeError):
  """Another run holds the workdir."""


class WorkdirLock:
  """``lock.json`` in the workdir, locked (flock) by the run that uses it; it names the
  holder (host, pid, start time). The operating system releases the lock when its process
  ends, however it ends, so the lock of a killed run is simply taken over. A multi-process
  job holds one lock, taken by process 0 for all. A study locks its directory the same way
  (``name="study.lock.json"``, ``holder="study"``)."""

  def __init__(self, workdir: pathlib.Path, name: str = "lock.json", holder: str = "run"):
    self.path = workdir / name
    self.holder = holder
    self._file = None

  def acquire(self) -> None:
    error = None
    if jax.process_index() == 0:
      error = self._acquire_here()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
      if refused and error is None:
        error = WorkdirInUseError(f"Workdir {self.path.parent} is in use: process 0 of this "
                                  "job could not lock it (see its output).")
    if error is not None:
      raise error

  def _acquire_here(self) -> WorkdirInUseError | None:
    refuse_link(self.path)
    f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+",
                  encoding="utf-8")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read()
      f.close()
      return WorkdirInUseError(
          f"Workdir {self.path.parent} is in use by another {self.holder} "
          f"({_holder_text(holder)}); wait for it to end, or use another --workdir.")
    f.seek(0)
    previous = f.read()
    if previous.strip():
      print(f"Taking over the lock of a {self.holder} that ended without releasing it "
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
    return shorten(f"host {h['host']}, pid {h['pid']}, started {h['started']}")
  except (ValueError, KeyError, TypeError):
    return "holder unknown"
