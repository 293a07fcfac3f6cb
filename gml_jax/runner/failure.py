"""One failure path for the runner's CLIs (``main``, ``study``, ``prepare``): whatever goes
wrong ends in one line, ``Error: ...``, the last on the console, with the details in a log
file where one can be written."""

from __future__ import annotations

import datetime
import json
import re
import sys
import traceback
from typing import Any

from absl import flags

from gml_jax.runner import storage

ECHO_LIMIT = 200
"""Longest value a message echoes (longer ones are cut, saying how long they were)."""


def shorten(value: Any, limit: int = ECHO_LIMIT) -> str:
  """``str(value)`` cut to ``limit`` characters."""
  text = str(value)
  if len(text) <= limit:
    return text
  return f"{text[:limit]}... ({len(text)} characters)"


def one_line(error: BaseException) -> str:
  """The message of ``error`` on one line (the text of a KeyError inside an AttributeError,
  as ml_collections raises for an unknown field, without its quotes)."""
  if isinstance(error, AttributeError) and error.args and isinstance(error.args[0], KeyError):
    error = error.args[0]
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return " ".join(str(text).split()) or type(error).__name__


def _flag_error(error: BaseException, argv: list[str]) -> str:
  """What a failed flag parse says, on one line, naming the flag."""
  text = str(error)
  if "Traceback (most recent call last)" in text:  # a config file's get_config() raised
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    return last.split(": ", 1)[1] if ": " in last and last.split(":")[0].isidentifier() else last
  bad_bool = re.match(r"flag (--\S+?)=(.*?): \('Non-boolean argument", text)
  if bad_bool:
    return f"{bad_bool.group(1)}={shorten(bad_bool.group(2))}: expected True or False."
  if isinstance(error, AttributeError) and error.args and isinstance(error.args[0], KeyError):
    key = str(error.args[0].args[0]).split("\n")[0].strip("'") if error.args[0].args else ""
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                 and key and key in a.split("=")[0].split(".")), "--config")
    from gml_jax.runner.methods import LEGACY_FIELDS

    if flag.startswith("--config.balance.") and flag.count(".") == 2 and (
        flag.rsplit(".", 1)[1] in LEGACY_FIELDS):
      return (f"{flag}: the old layout: a method's options now live under its name; use "
              f"--config.{LEGACY_FIELDS[flag.rsplit('.', 1)[1]]}.")
    return f"{flag}: unknown config field. {one_line(error)}"
  return shorten(one_line(error), 2 * ECHO_LIMIT)


def print_error(reason: str, stream=None) -> None:
  """Prints ``Error: reason`` as the last console line, on a line of its own (standard
  output flushed first; a newline first, in case a library's thread left a line open), to
  ``stream`` (default: standard error)."""
  sys.stdout.flush()
  print(f"\nError: {reason}", file=stream or sys.stderr, flush=True)


def read_json(path: storage.Path) -> Any:
  """The JSON in ``path``; a ValueError naming the file when it is not valid JSON."""
  text = storage.path(path).read_text()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({json_error(e)}); it was cut or edited.") from None


def json_error(error: json.JSONDecodeError) -> str:
  """Where and what: "Expecting ',' delimiter at line 3 column 5"; json's messages that end
  in "starting at" take the place without a second "at"."""
  where = f"line {error.lineno} column {error.colno}"
  return f"{error.msg} {where}" if error.msg.endswith(" at") else f"{error.msg} at {where}"


def fail(error: BaseException, log_dir: storage.Path | str | None, log_name: str = "error.log",
         explained: tuple[type, ...] = (), show_traceback: bool = True,
         stream=None) -> int:
  """Ends a failed command: the traceback into ``log_dir/log_name`` (when the folder exists
  and the log can be written), the one-line reason last on the console (``stream``,
  default standard error); returns the exit status (1). ``explained`` errors carry their
  own explanation: their traceback stays in the log; others (faults of the code) also go
  to the console first."""
  stream = stream or sys.stderr
  detail = "".join(traceback.format_exception(error))
  where = ""
  entry = f"{datetime.datetime.now().isoformat(timespec='seconds')}\n{detail}\n"
  log = None
  try:
    folder = storage.path(log_dir) if log_dir is not None else None
    if folder is not None and folder.is_dir():
      log = folder / log_name
      if storage.is_link(log):
        raise OSError(f"{log} is a symbolic link")
      storage.append_text(log, entry)
      where = f" (details: {log})"
  except Exception as e:  # noqa: BLE001 (the log is a courtesy: the reason still prints)
    where = f" (the details could not be written to {log or log_dir}: {one_line(e)})"
  if show_traceback and not isinstance(error, explained):
    sys.stdout.flush()
    stream.write(detail)
  print_error(f"{one_line(error)}{where}", stream)
  return 1


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for ``app.run(..., flags_parser=parse_flags)``: a bad flag, an
  unknown config field or variant, a bad value ends in one ``Error:`` line (status 2)
  instead of a traceback and absl's usage hint."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 (the CLIs' one failure path: one Error line)
    print_error(_flag_error(e, argv))
    sys.exit(2)
