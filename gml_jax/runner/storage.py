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
  (:class:`~gml_jax.runner.workdir.WorkdirLock`).

Credentials are the user's: the Cloud Storage client finds them (a TPU VM's service account,
``gcloud auth application-default login``). ``STORAGE_EMULATOR_HOST`` points the clients at
an emulator (the tests'); orbax's checkpoints go through tensorstore, which reads
``TENSORSTORE_GCS_HTTP_URL`` for the same purpose.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Union

from etils import epath

# gcsfs and google-auth warn on every bucket access where a credentials lookup fails before
# another succeeds (an emulator's anonymous access): lines on every run's console.
for _logger in ("gcsfs", "google.auth"):
  logging.getLogger(_logger).setLevel(logging.ERROR)

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
