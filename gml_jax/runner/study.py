r"""A study: every (method, seed[, grid point]) of one experiment as an ordinary run, then
the aggregate (mean ± std over seeds, paired differences with a 95% interval) and figures.

  python -m gml_jax.runner.study --config experiments/colored_mnist.py --seeds 0-4 \
      --workdir runs/study_cm
  python -m gml_jax.runner.study --config experiments/colored_mnist.py --seeds 0-2 \
      --methods vanilla,guided --grid balance.guided.alpha=0.001,0.01,0.1 --workdir runs/alpha \
      --config.num_epochs=5
  make study EXP=colored_mnist SEEDS=5 ARGS="--config.data.builder_config=var_0.05"
  make study EXP=colored_mnist SEEDS=5 \
      METHODS=vanilla,random,guided,ogm_ge,unimodal_0,unimodal_1,late_fusion

Each run is ``python -m gml_jax.runner.main`` in its own workdir under the study's
(``<method>/seed_<s>``, below ``<grid point>/`` with ``--grid``), with its console output
in ``run.log`` there: a finished run (one with ``summary.json``) is skipped, an unfinished
one resumes, so an interrupted study continues where it stopped. ``--config.<field>=<value>``
overrides go to every run, as in ``make train``; ``--run_args`` adds flags of the runs.
The study writes ``study.json``, ``study.md`` and ``plots/``, always, from the runs whose
summaries it could read; a run that failed or whose summary is missing or malformed is
reported (its log, or the file and what is wrong with it) and left out, and the study then
exits with status 1.

Every argument is checked before any run starts (seeds, methods, ``--parallel``, and each
grid point against the config's own checks). One study holds a directory at a time
(``study.lock.json``, taken over after a killed study). SIGINT or SIGTERM to the study asks
its running runs to stop at their next checkpoint, waits for them, says what happened to
each (stopped at its checkpoint of step N, or killed, with the step of its last checkpoint)
and exits with 128 + the signal's number; a second signal kills them. Runs run in their own
session (a Ctrl-C at the terminal reaches the study alone) and die with a killed study, so
no run outlives it holding its workdir; the same command resumes them.

Runs see the study's devices (each run is data-parallel over all of them, as a plain run);
``--parallel N`` runs N at once, which pays only where one run leaves the devices idle.
For a multi-process job, start the study on every host with the same arguments and
``--run_args='--distributed [--coordinator_address=... --num_processes=N --process_id=I]'``:
the hosts go through the runs in the same order, each run as one job; the host with
process id 0 writes the aggregate.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gml_jax.runner import build, failure, methods, names, storage, study_report
from gml_jax.runner.workdir import (
  WorkdirInUseError,
  WorkdirLock,
  atomic_write,
  last_checkpoint,
  refuse_link,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (without a variant), e.g. "
    "experiments/colored_mnist.py; --config.<field>=<value> overrides go to every run.",
    lock_config=True)
_METHODS = flags.DEFINE_list(
    "methods", list(names.STUDY_METHODS), "Methods (config variants) to run, some of "
    f"{list(names.VARIANTS)}: the registered methods (gml_jax/runner/methods/) and their "
    "variants (controls; vanilla's baselines: each modality alone, late fusion).")
_SEEDS = flags.DEFINE_string("seeds", "0-4", "Seeds: a range 0-4, a list 0,3,7, or both: 0-2,5.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The study's directory (runs below it).")
_GRID = flags.DEFINE_multi_string(
    "grid", [], "An extra axis: field=value,value,... (e.g. balance.guided.alpha=0.001,0.01,0.1: a "
    "method's options reach only its own runs; "
    "tuples as data.modalities=(0,),(1,)); repeat for several axes (their product is run).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at once (>= 1), each its own process.")
_RUN_ARGS = flags.DEFINE_string("run_args", "", "More flags for every run, e.g. "
                                "'--distributed --num_processes=2 --process_id=0'.")
flags.mark_flags_as_required(["config", "workdir"])

# A study's own failures: their message says it all (a fault of the code shows its traceback).
EXPLAINED = (ValueError, OSError, WorkdirInUseError)


@dataclasses.dataclass
class Run:
  method: str
  seed: int
  point: tuple[tuple[str, str], ...]  # the grid point: (field, value) per axis
  workdir: storage.Path
  # pending, finished, skipped (finished before), failed, stopped (at a checkpoint), killed
  # (by the study's second signal), not started (the study was stopped first), unreadable
  # (its summary is missing or malformed)
  status: str = "pending"
  seconds: float | None = None
  log_name: str = "run.log"  # run.<i>.log for process i > 0 of a multi-process job
  problem: str = ""  # why it is left out (failed, unreadable), how it stopped (stopped, killed)

  @property
  def point_label(self) -> str:
    return ",".join(f"{k}={v}" for k, v in self.point)

  @property
  def name(self) -> str:
    return " ".join(filter(None, [self.point_label, self.method, f"seed {self.seed}"]))

  @property
  def log(self) -> storage.Path:
    return self.workdir / self.log_name

  @property
  def local_log(self) -> pathlib.Path:
    """Where the run's console output goes while it runs: its log, or on a bucket (no
    appends to an object) a local file that :meth:`upload_log` adds to the log."""
    if not storage.is_remote(self.workdir):
      return self.log
    name = hashlib.sha256(str(self.log).encode()).hexdigest()[:16]
    return storage.local_cache_dir(mkdir=True) / f"study_run_{name}.log"

  def upload_log(self) -> None:
    """On a bucket: the console output of the run that ended, added to its log."""
    local = self.local_log
    if local != self.log and local.exists():
      storage.append_text(self.log, local.read_text())
      local.unlink()

  @property
  def summary_path(self) -> storage.Path:
    return self.workdir / "summary.json"

  def finished(self) -> bool:
    """Whether the run has a summary (a link in its place counts: the run refuses it)."""
    path = self.summary_path
    return path.exists() or storage.is_link(path)

  def summary(self) -> dict:
    """The run's summary; a ValueError naming the file and what is wrong with it."""
    path = self.summary_path
    if not path.exists():
      raise ValueError(f"{path} is missing (was the run's folder moved or deleted?)")
    refuse_link(path)
    summary = failure.read_json(path)
    if not isinstance(summary, dict) or not isinstance(
        summary.get(names.split("test", names.ACCURACY)), (int, float)):
      raise ValueError(f"{path} is not a run summary: expected a JSON object with a "
                       f"test_accuracy number, got {failure.shorten(json.dumps(summary), 80)}")
    return summary


# --------------------------------------------------------------------------------------
# Arguments, all checked before any run


def parse_seeds(text: str) -> list[int]:
  """``0-4``, ``0,3,7`` or both (``0-2,5``): distinct integers >= 0, in the order given."""
  seeds = []
  for item in text.split(","):
    item = item.strip()
    single, span = re.fullmatch(r"\d+", item), re.fullmatch(r"(\d+)-(\d+)", item)
    if span and int(span.group(1)) > int(span.group(2)):
      raise app.UsageError(f"--seeds={failure.shorten(text)}: the range {item} goes down; "
                           "expected first-last with first <= last, e.g. 0-4.")
    if not (single or span):
      raise app.UsageError(f"--seeds={failure.shorten(text)}: {failure.shorten(item)!r} is not "
                           "a seed or a range; expected integers >= 0, e.g. 0-4, 0,3,7 or 0-2,5.")
    seeds += [int(item)] if single else list(range(int(span.group(1)), int(span.group(2)) + 1))
  repeated = sorted({s for s in seeds if seeds.count(s) > 1})
  if repeated:
    raise app.UsageError(f"--seeds={failure.shorten(text)}: seeds {repeated} are listed more "
                         "than once; each seed is one run.")
  return seeds


def split_values(text: str) -> list[str]:
  """``a,b,(c,d)`` -> ``["a", "b", "(c,d)"]``: commas inside brackets or quotes stay."""
  values, depth, quote, current = [], 0, None, ""
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      values.append(current)
      current = ""
      continue
    current += char
  return values + [current]


def parse_value(text: str, current):
  """A grid value as the config field holding ``current`` takes it (a ValueError if not)."""
  if isinstance(current, bool):
    if text.lower() not in ("true", "false"):
      raise ValueError("expected True or False")
    return text.lower() == "true"
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if isinstance(current, (tuple, list)):
      raise ValueError(f"expected a tuple like {current!r}") from None
    return text
  if isinstance(current, (tuple, list)) and not isinstance(value, (tuple, list)):
    raise ValueError(f"expected a tuple like {current!r}")
  return tuple(value) if isinstance(current, tuple) else value


def parse_grid(axes: list[str], config) -> list[tuple[tuple[str, str], ...]]:
  """``field=v1,v2`` per axis -> every grid point; each field must exist in the config and
  each value parse as its type."""
  parsed = []
  for axis in axes:
    field, _, values = axis.partition("=")
    try:
      current = build.config_field(config, field)
    except (KeyError, AttributeError, TypeError):
      raise app.UsageError(f"--grid {failure.shorten(axis)}: the config has no field "
                           f"{field!r}.") from None
    if not values:
      raise app.UsageError(f"--grid {failure.shorten(axis)}: expected {field}=value,value,...")
    points = []
    for value in split_values(values):
      try:
        parse_value(value, current)
      except ValueError as e:
        raise app.UsageError(f"--grid {failure.shorten(axis)}: {failure.shorten(value)!r} is not "
                             f"a value of {field} ({e}).") from None
      points.append((field, value))
    if len({v for _, v in points}) != len(points):
      raise app.UsageError(f"--grid {failure.shorten(axis)}: a value is listed twice.")
    parsed.append(points)
  return list(itertools.product(*parsed))


def _load_variant(config_file: str, method: str):
  spec = importlib.util.spec_from_file_location("study_config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(method)


def _set_field(config, path: str, value) -> None:
  *parents, name = path.split(".")
  for part in parents:
    config = config[part]
  setattr(config, name, value)


def for_variant(fields, variant: str) -> list:
  """The (field, value) pairs that reach a run of ``variant``: every field but the options
  of the methods it does not run (``balance.<other method>.*``, which its checks refuse),
  so that a study's overrides and grids of one method's options leave the others alone."""
  own = methods.variant_method(variant).name
  other = lambda field: (field.startswith("balance.") and field.count(".") >= 2
                         and field.split(".")[1] in methods.names()
                         and field.split(".")[1] != own)
  return [(field, value) for field, value in fields if not other(field)]


def check_every_run_config(config_file: str, variants, points, overrides: dict,
                           seeds) -> None:
  """Each (variant, grid point)'s config through the config's own checks, before any run:
  a bad value is refused here, naming the grid point, not found by every run failing."""
  for method, point in itertools.product(variants, points):
    config = _load_variant(config_file, method)
    for field, value in for_variant(overrides.items(), method):
      _set_field(config, field, value)
    for field, text in for_variant(point, method):
      _set_field(config, field, parse_value(text, build.config_field(config, field)))
    config.seed = seeds[0]
    where = ", ".join(filter(None, [",".join(f"{k}={v}" for k, v in point), method]))
    try:
      build.check_config(config)
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(f"The run {where} would fail: {failure.one_line(e)}") from None


# --------------------------------------------------------------------------------------
# Running


def run_command(config_file: str, run: Run, overrides: dict, run_args: str) -> list[str]:
  """The command line of ``run``: the study's overrides and the run's grid point (those of
  its own method: :func:`for_variant`) as ``--config.<field>=<value>`` flags."""
  given = [(k, v if isinstance(v, str) else repr(v)) for k, v in overrides.items()]
  flags = [f"--config.{k}={v}" for k, v in for_variant([*given, *run.point], run.method)]
  return [sys.executable, "-m", "gml_jax.runner.main", f"--config={config_file}:{run.method}",
          f"--workdir={run.workdir}", *flags, f"--config.seed={run.seed}",
          *shlex.split(run_args)]


class StopRequest:
  """SIGINT and SIGTERM to the study, counted: the first stops the runs at their next
  checkpoint, the second kills them."""

  def __init__(self):
    self.signum, self.count, self._previous = None, 0, {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = self.signum or signum
    self.count += 1

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# Run by each run's process before it becomes the run: killed (SIGKILL) when the study's
# process ends, however it ends, so that no run outlives a killed study holding its
# workdir's lock (Linux's PR_SET_PDEATHSIG, kept across exec).
_DIE_WITH_STUDY = """import ctypes, os, sys
ctypes.CDLL(None).prctl(1, 9)
if os.getppid() != int(sys.argv[1]):
  sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _start(run: Run, command) -> subprocess.Popen:
  run.workdir.mkdir(parents=True, exist_ok=True)
  refuse_link(run.log)
  argv = command(run)
  if sys.platform.startswith("linux"):
    argv = [sys.executable, "-c", _DIE_WITH_STUDY, str(os.getpid()), *argv]
  with open(run.local_log, "a", encoding="utf-8") as log:  # the child keeps its own copy
    # Its own session: a Ctrl-C at the terminal reaches the study alone, which stops the
    # runs itself (a second signal to a run would interrupt it without a checkpoint).
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"}, start_new_session=True)


def execute(runs: list[Run], command, parallel: int, stop: StopRequest,
            writer: bool = True) -> None:
  """Runs every pending run (``parallel`` at a time), printing a line per run started,
  finished, failed, skipped or stopped, with the time left estimated from the runs done so
  far. A run is finished when it exits with status 0 and (on the ``writer``, whose runs are
  process 0 of their jobs and write the summaries) has written its summary."""
  total = len(runs)
  todo = []
  for i, run in enumerate(runs):
    if run.finished():
      run.status = "skipped"
      print(f"[{i + 1}/{total}] skipped {run.name}: finished before", flush=True)
    else:
      todo.append((i, run))
  running, durations, asked = [], [], 0
  while todo or running:
    while todo and len(running) < parallel and not stop.count:
      i, run = todo.pop(0)
      running.append((i, run, _start(run, command), time.perf_counter()))
      print(f"[{i + 1}/{total}] started {run.name}", flush=True)
    if stop.count > asked:  # forward the signal: SIGTERM first, SIGKILL the second time
      asked = stop.count
      for _, _run, proc, _ in running:
        proc.send_signal(signal.SIGTERM if asked == 1 else signal.SIGKILL)
      for _, run in todo:
        run.status = "not started"
      todo = []
      print(f"Stopping: {len(running)} running run(s) "
            f"{'stop at their next checkpoint' if asked == 1 else 'killed'}.", flush=True)
    time.sleep(0.2)
    for entry in [e for e in running if e[2].poll() is not None]:
      running.remove(entry)
      i, run, proc, started = entry
      run.upload_log()
      run.seconds = time.perf_counter() - started
      durations.append(run.seconds)
      left = (len(todo) + len(running)) * float(np.mean(durations)) / parallel
      if proc.returncode == 0 and (run.summary_path.exists() or not writer):
        run.status = "finished"
        print(f"[{i + 1}/{total}] finished {run.name} in {run.seconds:.0f} s; about "
              f"{_minutes(left)} left", flush=True)
      elif stop.count and proc.returncode is not None and proc.returncode <= 0:
        _report_stopped(f"[{i + 1}/{total}]", run, proc.returncode)
      else:
        run.status, run.problem = "failed", f"exit {proc.returncode}; {_log_of(run)}"
        print(f"[{i + 1}/{total}] FAILED {run.name} ({run.problem})", flush=True)


def _checkpoint_text(run: Run) -> str:
  """"step N" of the run's newest checkpoint, or "none"."""
  checkpoint = last_checkpoint(run.workdir)
  return f"step {checkpoint.name}" if checkpoint is not None else "none"


def _report_stopped(prefix: str, run: Run, returncode: int) -> None:
  """A run that ended after the study's stop request, as it ended: stopped at a checkpoint
  (exit 0) or killed by a signal (its newest checkpoint named: what it resumes from)."""
  if returncode == 0:
    run.status, run.problem = "stopped", f"at its checkpoint of {_checkpoint_text(run)}"
    print(f"{prefix} stopped {run.name} {run.problem}; it resumes when the study runs "
          "again", flush=True)
    return
  run.status = "killed"
  run.problem = (f"killed by {signal.Signals(-returncode).name}; last checkpoint: "
                 f"{_checkpoint_text(run)}")
  print(f"{prefix} {run.problem.replace('killed by', f'killed {run.name} by', 1)}; it resumes "
        "from there when the study runs again", flush=True)


def _log_of(run: Run) -> str:
  """Where the run's output is: its log, or that its folder is gone with it."""
  if run.log.exists():
    return f"log: {run.log}"
  if not run.workdir.exists():
    return f"its folder {run.workdir} was deleted while it ran, its log with it"
  return f"its log {run.log} was deleted while it ran"


def stop_report(runs: list[Run], signum: int) -> str:
  """The study's last line after a stop request: what happened to each run it had started
  (stopped at its checkpoint, or killed with the step of its last checkpoint named)."""
  stopped = [r.name for r in runs if r.status == "stopped"]
  killed = [f"{r.name}, {r.problem.split('; ')[1]}" for r in runs if r.status == "killed"]
  waiting = sum(r.status == "not started" for r in runs)
  return (f"Stopped by {signal.Signals(signum).name}: {len(stopped)} run(s) stopped at their "
          f"checkpoints ({', '.join(stopped) or 'none'}), "
          + (f"{len(killed)} killed ({'; '.join(killed)}), " if killed else "")
          + f"{waiting} not started. Run the same command to resume.")


def _process_id(run_args: str) -> int:
  """The process id the runs have in their multi-process jobs (0 when not given)."""
  ids = [a.split("=", 1)[1] for a in shlex.split(run_args) if a.startswith("--process_id=")]
  return int(ids[-1]) if ids else 0


def _minutes(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


# --------------------------------------------------------------------------------------
# The study


def readable_runs(runs: list[Run]) -> list[tuple[Run, dict]]:
  """(run, summary) of every finished run whose summary reads as one; the others are
  marked unreadable and reported (the file and what is wrong with it)."""
  readable = []
  for run in runs:
    if run.status not in ("finished", "skipped"):
      continue
    try:
      readable.append((run, run.summary()))
    except (ValueError, OSError) as e:
      run.status, run.problem = "unreadable", failure.one_line(e)
      print(f"LEFT OUT {run.name}: {run.problem}", flush=True)
  return readable


def write_study(workdir: storage.Path, runs: list[Run], experiment: str, started: float) -> None:
  """study.json and study.md from the runs whose summaries read, then the plots."""
  done = readable_runs(runs)
  result = study_report.aggregate([{"method": r.method, "seed": r.seed, "point": r.point_label,
                                    "summary": s} for r, s in done])
  result |= {
      "experiment": experiment,
      "command": " ".join(["python -m gml_jax.runner.study", *sys.argv[1:]]),
      "wall_seconds": time.perf_counter() - started,
      "runs": [{"method": r.method, "seed": r.seed, "point": r.point_label, "status": r.status,
                "workdir": str(r.workdir), "seconds": r.seconds, "problem": r.problem or None}
               for r in runs],
  }
  atomic_write(workdir / "study.json", json.dumps(result, indent=2))
  atomic_write(workdir / "study.md", study_report.markdown(result))
  print("\n" + study_report.markdown(result))
  if done:
    try:
      study_report.plots(result, {r.workdir: r for r, _ in done}, workdir / "plots")
    except (ValueError, OSError, KeyError) as e:  # a run's logs unreadable: the tables stand
      print(f"The plots could not be drawn: {failure.one_line(e)}")


@dataclasses.dataclass
class Plan:
  """A study's checked arguments and its runs."""

  experiment: str
  config_file: str
  overrides: dict
  workdir: storage.Path
  process: int
  runs: list[Run]
  header: str  # its first console line


def plan(argv) -> Plan:
  """Every argument checked (and every run's config), the runs listed; nothing written."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_file = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  variants = _METHODS.value
  unknown = [m for m in variants if m not in names.VARIANTS]
  if unknown or not variants:
    raise app.UsageError(f"Unknown methods {unknown}; expected some of {names.VARIANTS}.")
  if len(set(variants)) != len(variants):
    raise app.UsageError(f"--methods={','.join(variants)}: a method is listed twice.")
  if _PARALLEL.value < 1:
    raise app.UsageError(f"--parallel={_PARALLEL.value}: expected an integer >= 1.")
  seeds = parse_seeds(_SEEDS.value)
  points = parse_grid(_GRID.value, config)
  for axis in _GRID.value:
    field = axis.partition("=")[0]
    if not any(for_variant([(field, None)], v) for v in variants):
      raise app.UsageError(
          f"--grid {failure.shorten(axis)}: no run of --methods={','.join(variants)} reads it: "
          f"balance.{field.split('.')[1]}.* reaches the runs of method "
          f"'{field.split('.')[1]}' only.")
  check_every_run_config(config_file, variants, points, overrides, seeds)
  workdir = storage.path(_WORKDIR.value)
  process = _process_id(_RUN_ARGS.value)
  runs = []
  for point in points:
    base = workdir.joinpath(*[f"{k}={v}" for k, v in point])
    runs += [Run(m, s, point, base / m / f"seed_{s}",
                 log_name=f"run.{process}.log" if process else "run.log")
             for m in variants for s in seeds]
  header = (f"Study of {config.experiment}: {len(variants)} methods x {len(seeds)} seeds x "
            f"{len(points)} grid points = {len(runs)} runs in {workdir}")
  return Plan(config.experiment, config_file, overrides, workdir, process, runs, header)


def study(argv) -> int:
  p = plan(argv)
  runs, workdir = p.runs, p.workdir
  workdir.mkdir(parents=True, exist_ok=True)
  lock = WorkdirLock(workdir, f"study.lock.{p.process}.json" if p.process else "study.lock.json",
                     holder="study")
  lock.acquire()
  try:
    print(p.header, flush=True)
    started = time.perf_counter()
    writer = p.process == 0  # the host whose runs write the summaries writes the aggregate
    with StopRequest() as stop:
      execute(runs, lambda run: run_command(p.config_file, run, p.overrides, _RUN_ARGS.value),
              _PARALLEL.value, stop, writer)
    if writer:
      write_study(workdir, runs, p.experiment, started)
    else:
      print("The runs are done; the study of process 0 writes the aggregate.")
    return _report_end(runs, workdir, stop, writer)
  finally:
    lock.release()


def _report_end(runs: list[Run], workdir, stop: StopRequest, writer: bool) -> int:
  """The study's last lines and its exit status."""
  left_out = [r for r in runs if r.status in ("failed", "unreadable")]
  for r in left_out:
    print(f"{r.status.upper()}: {r.name}; {r.problem}")
  if writer:
    print(f"\nStudy: {workdir}/study.json, study.md, plots/", flush=True)
  if stop.signum:
    print(stop_report(runs, stop.signum), flush=True)
    return 128 + stop.signum
  if left_out:
    failure.print_error(failure.shorten(
        f"{len(left_out)} of {len(runs)} runs left out of the study: "
        + "; ".join(f"{r.name} ({r.problem})" for r in left_out), 1000))
    return 1
  return 0


def main(argv):
  try:
    sys.exit(study(argv))
  except app.UsageError as e:
    failure.print_error(failure.one_line(e))
    sys.exit(2)
  except Exception as e:  # noqa: BLE001 (the CLI's one failure path: one Error line)
    # A study refused (another holds its directory) writes nothing there.
    log_dir = None if isinstance(e, WorkdirInUseError) else _WORKDIR.value or None
    sys.exit(failure.fail(e, log_dir, "study_error.log", EXPLAINED))


if __name__ == "__main__":
  app.run(main, flags_parser=failure.parse_flags)
