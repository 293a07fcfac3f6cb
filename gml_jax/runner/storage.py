"""Where the runner's files live: a local directory, or a Cloud Storage bucket (``gs://``).

Every path the runner takes from a user goes through :func:`path`: a local one becomes an
absolute ``pathlib.Path`` (with the local guards: no symbolic links, ``flock``), and
``gs://bucket/...`` an ``etils.epath.Path``, the path type of orbax and tensorflow-datasets,
which reads and writes the bucket through ``gcsfs`` (``pip install -e
'.[experiments,gcs]'``). A ``gs://`` path is never turned into a local one. The two kinds
share pathlib's methods (``/``, ``exists``, ``read_text``, ``write_text``, ``mkdir``,
``glob``, ``iterdir``); what differs between a disk and an object store is decided here:

* a whole-file write is atomic on both: a temporary file renamed over the old one on a disk,
  one object upload (readers see the old object or the new one) on a bucket;
* objects cannot be appended to: :class:`~gml_jax.runner.logs.MetricLog` buffers its rows
  there and writes them as numbered parts;
* a lock is ``flock`` on a disk and a leased object on a bucket
  (:class:`~gml_jax.runner.workdir.WorkdirLock`);
* a bucket can be out of reach for a while: a run's saves (its logs and checkpoints) are
  retried by :func:`with_retries`, ``GML_JAX_STORAGE_RETRIES`` times (5) every
  ``GML_JAX_STORAGE_RETRY_SECONDS`` (30 s), with one console line per retry; once the
  retries are spent the run ends in one line (:class:`StorageUnavailableError`) naming the
  bucket, with its last checkpoint intact. The libraries' own retries of a refused
  connection are cut short (:func:`quiet_library_retries`), so that the runner's are the
  ones that count, and show.

Credentials are the user's: the Cloud Storage client finds them (a TPU VM's service account,
``gcloud auth application-default login``). ``STORAGE_EMULATOR_HOST`` points the clients at
an emulator (the tests'); orbax's checkpoints go through tensorstore, which reads
``TENSORSTORE_GCS_HTTP_URL`` for the same purpose.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import sys
import time
from typing import Callable, TypeVar, Union

from etils import epath

# gcsfs and google-auth warn on every bucket access where a credentials lookup fails before
# another succeeds (an emulator's anonymous access): lines on every run's console.
logging.getLogger("google.auth").setLevel(logging.ERROR)
# gcsfs also logs every request it gives up on, with its traceback, at ERROR: the error
# itself reaches the runner, which reports it in one line (with_retries, failure.fail).
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

REMOTE_SCHEMES = ("gs://",)

# A path as the runner holds it: local (pathlib) or on a bucket (epath).
Path = Union[pathlib.Path, epath.Path]


def is_remote(p: str | os.PathLike) -> bool:
  """Whether ``p`` names an object store (``gs://...``) rather than a local path."""
  return str(p).startswith(REMOTE_SCHEMES)


def path(p: str | os.PathLike) -> Path:
  """The runner's path for ``p``: ``gs://...`` as it is, a local path absolute and with
  ``~`` expanded. Other URL schemes are refused (they would become local directories)."""
  text = os.fspath(p)
  if is_remote(text):
    return epath.Path(text)
  if "://" in text:
    raise ValueError(f"{text}: unsupported storage; expected a local path or "
                     f"{' or '.join(s + 'bucket/...' for s in REMOTE_SCHEMES)}.")
  return pathlib.Path(text).expanduser().resolve()


def is_link(p: Path) -> bool:
  """Whether ``p`` is a symbolic link (never, on a bucket)."""
  return not is_remote(p) and p.is_symlink()


def append_text(p: Path, text: str) -> None:
  """Adds ``text`` at the end of ``p``: an append on a disk; on a bucket, where objects
  cannot be appended to, the object rewritten whole (for small, rare additions: a failure's
  traceback, a finished run's console output)."""
  if is_remote(p):
    p.write_text((p.read_text() if p.exists() else "") + text)
    return
  with open(p, "a", encoding="utf-8") as f:
    f.write(text)


def local_cache_dir(mkdir: bool = False) -> pathlib.Path:
  """Where copies of remote files that must be local are kept (``GML_JAX_CACHE``, default
  ``~/.cache/gml_jax``): built datasets read from a bucket, TensorBoard events before upload."""
  cache = pathlib.Path(os.environ.get("GML_JAX_CACHE", "~/.cache/gml_jax")).expanduser()
  if mkdir:
    cache.mkdir(parents=True, exist_ok=True)
  return cache


# --------------------------------------------------------------------------------------
# A bucket out of reach


class StorageUnavailableError(OSError):
  """A bucket stayed out of reach through every retry of :func:`with_retries`."""


# What the storage libraries say when the server cannot be reached (aiohttp through gcsfs,
# requests through google-cloud-storage, tensorstore's status codes through orbax).
_UNREACHABLE = re.compile(r"Cannot connect to host|Connect call failed|Connection refused|"
                          r"Could not connect to server|Failed to connect to|"
                          r"Connection reset|Max retries exceeded|UNAVAILABLE:|"
                          r"DEADLINE_EXCEEDED:|Failed to establish a new connection|"
                          r"Server disconnected|Name or service not known")


def unreachable_reason(error: BaseException) -> str | None:
  """The first line of the error in ``error``'s chain that says the storage server could
  not be reached, or None when it is something else (a missing file, a refused request)."""
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    text = str(error).strip()
    if isinstance(error, ConnectionError) or _UNREACHABLE.search(text):
      return (text.splitlines() or [type(error).__name__])[0][:200]
    error = error.__cause__ or error.__context__
  return None


def bucket_of(p: Path) -> str:
  """``gs://bucket`` of a path on a bucket."""
  scheme = next(s for s in REMOTE_SCHEMES if str(p).startswith(s))
  return scheme + str(p)[len(scheme):].split("/")[0]


def retry_policy() -> tuple[int, float]:
  """(retries, seconds between them): ``GML_JAX_STORAGE_RETRIES`` (5) and
  ``GML_JAX_STORAGE_RETRY_SECONDS`` (30), read when a save fails."""
  retries = os.environ.get("GML_JAX_STORAGE_RETRIES", "5")
  seconds = os.environ.get("GML_JAX_STORAGE_RETRY_SECONDS", "30")
  try:
    policy = int(retries), float(seconds)
  except ValueError:
    policy = (-1, -1.0)
  if policy[0] < 0 or policy[1] < 0:
    raise ValueError(f"GML_JAX_STORAGE_RETRIES={retries}, GML_JAX_STORAGE_RETRY_SECONDS="
                     f"{seconds}: expected an integer >= 0 and a number of seconds >= 0.")
  return policy


T = TypeVar("T")
_RETRIED: list[str] = []  # what was retried in this process


def retried() -> bool:
  """Whether anything was retried in this process (:func:`with_retries`)."""
  return bool(_RETRIED)


def with_retries(p: Path, what: str, attempt: Callable[[int], T], after: Callable[[], str],
                 echo: Callable[[str], None] = print) -> T:
  """``attempt(i)`` (i: the attempt's number, 0 first), tried again while the bucket of
  ``p`` cannot be reached, :func:`retry_policy` times, with one line per retry through
  ``echo``; other errors, and any on a local disk, are raised at once. When the retries are
  spent, a :class:`StorageUnavailableError` naming the bucket, what failed (``what``) and
  ``after()`` (what is intact and how to go on)."""
  retries, seconds, first_failure = None, 0.0, 0.0
  tried = 0
  while True:
    try:
      return attempt(tried)
    except Exception as e:  # noqa: BLE001 (only an unreachable bucket is retried)
      reason = unreachable_reason(e) if is_remote(p) else None
      if reason is None:
        raise
      if retries is None:
        retries, seconds, first_failure = *retry_policy(), time.monotonic()
      if tried == retries:
        raise StorageUnavailableError(
            f"The bucket {bucket_of(p)} cannot be reached ({reason}): {what} failed "
            f"{tried + 1} times in {time.monotonic() - first_failure:.0f} s ({retries} "
            f"retries, {seconds:g} s apart). {after()}") from e
      tried += 1
      _RETRIED.append(what)
      echo(f"The bucket {bucket_of(p)} cannot be reached ({reason}): {what}, retry {tried} "
           f"of {retries} in {seconds:g} s.")
      time.sleep(seconds)


def quiet_library_retries() -> None:
  """Cuts short the storage libraries' own retries of a server that cannot be reached
  (gcsfs: 6 tries over ~17 s per request, then a logged traceback; tensorstore: 32 tries
  over minutes), so that a run's saves fail over to :func:`with_retries`, which says what
  it does. Their retries of other transient errors (HTTP 429, 5xx) stay as they are."""
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _UnreachableFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_UnreachableFilter())
    sys.excepthook = _without_closed_loops(sys.excepthook)
  try:
    from gcsfs import retry as gcsfs_retry
  except ImportError:
    return
  if getattr(gcsfs_retry.is_retriable, "_gml_jax", False):
    return
  library_is_retriable = gcsfs_retry.is_retriable

  def is_retriable(exception):
    if unreachable_reason(exception) is not None:
      return False  # gcsfs raises it at once (its log of it is silenced above)
    return library_is_retriable(exception)

  is_retriable._gml_jax = True
  gcsfs_retry.is_retriable = is_retriable


class _UnreachableFilter(logging.Filter):
  """Drops the tracebacks that orbax logs (through absl) from its save threads when the
  bucket cannot be reached: the same error reaches the run, which reports it in a line."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return error is None or unreachable_reason(error) is None


def _without_closed_loops(excepthook):
  """``excepthook`` less the "Event loop is closed" errors that tensorstore's callbacks
  print (through it) when they complete the futures of a save that orbax abandoned, with
  its event loop, after a failure: dozens of tracebacks between a retry's line and the
  next, none of them the runner's."""

  def hook(kind, error, traceback):
    if not (kind is RuntimeError and str(error) == "Event loop is closed"):
      excepthook(kind, error, traceback)

  return hook
