r"""A study: every (method, seed[, grid point]) of one experiment as an ordinary run, then
the aggregate (mean ± std over seeds, paired differences with a 95% interval) and figures.

  python -m gml_jax.runner.study --config experiments/colored_mnist.py --seeds 0-4 \
      --workdir runs/study_cm
  python -m gml_jax.runner.study --config experiments/colored_mnist.py --seeds 0-2 \
      --methods vanilla,guided --grid balance.alpha=0.001,0.01,0.1 --workdir runs/alpha \
      --config.num_epochs=5
  make study EXP=colored_mnist SEEDS=5 ARGS="--config.data.builder_config=var_0.05"
  make study EXP=colored_mnist SEEDS=5 \
      METHODS=vanilla,random,guided,ogm_ge,unimodal_0,unimodal_1,late_fusion

Each run is ``python -m gml_jax.runner.main`` in its own workdir under the study's
(``<method>/seed_<s>``, below ``<grid point>/`` with ``--grid``), with its console output
in ``run.log`` there: a finished run (one with ``summary.json``) is skipped, an unfinished
one resumes, so an interrupted study continues where it stopped. ``--config.<field>=<value>``
overrides go to every run, as in ``make train``; ``--run_args`` adds flags of the runs.
The study writes ``study.json``, ``study.md`` and ``plots/``.

Runs see the study's devices (each run is data-parallel over all of them, as a plain run);
``--parallel N`` runs N at once, which pays only where one run leaves the devices idle.
For a multi-process job, start the study on every host with the same arguments and
``--run_args='--distributed [--coordinator_address=... --num_processes=N --process_id=I]'``:
the hosts go through the runs in the same order, each run as one job; the host with
process id 0 writes the aggregate.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments.common import VARIANTS
from gml_jax.balancing import METHODS
from gml_jax.runner import build, study_report
from gml_jax.runner.workdir import atomic_write

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (without a variant), e.g. "
    "experiments/colored_mnist.py; --config.<field>=<value> overrides go to every run.",
    lock_config=True)
_METHODS = flags.DEFINE_list(
    "methods", list(METHODS), f"Methods (config variants) to run, some of {list(VARIANTS)}: "
    "the paper's methods, OGM-GE, each modality alone, late fusion.")
_SEEDS = flags.DEFINE_string("seeds", "0-4", "Seeds: a range 0-4 or a list 0,3,7.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The study's directory (runs below it).")
_GRID = flags.DEFINE_multi_string(
    "grid", [], "An extra axis: field=value,value,... (e.g. balance.alpha=0.001,0.01,0.1); "
    "repeat for several axes (their product is run).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at once, each its own process.")
_RUN_ARGS = flags.DEFINE_string("run_args", "", "More flags for every run, e.g. "
                                "'--distributed --num_processes=2 --process_id=0'.")
flags.mark_flags_as_required(["config", "workdir"])

@dataclasses.dataclass
class Run:
  method: str
  seed: int
  point: tuple[tuple[str, str], ...]  # the grid point: (field, value) per axis
  workdir: pathlib.Path
  status: str = "pending"  # pending, finished, skipped (finished before), failed
  seconds: float | None = None
  log_name: str = "run.log"  # run.<i>.log for process i > 0 of a multi-process job

  @property
  def point_label(self) -> str:
    return ",".join(f"{k}={v}" for k, v in self.point)

  @property
  def name(self) -> str:
    return " ".join(filter(None, [self.point_label, self.method, f"seed {self.seed}"]))

  @property
  def log(self) -> pathlib.Path:
    return self.workdir / self.log_name

  def summary(self) -> dict | None:
    path = self.workdir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------------------
# Running


def parse_seeds(text: str) -> list[int]:
  if "-" in text:
    first, last = (int(x) for x in text.split("-"))
    return list(range(first, last + 1))
  return [int(x) for x in text.split(",") if x]


def parse_grid(axes: list[str], config) -> list[tuple[tuple[str, str], ...]]:
  """``field=v1,v2`` per axis -> every grid point; each field must exist in the config."""
  parsed = []
  for axis in axes:
    field, _, values = axis.partition("=")
    try:
      build.config_field(config, field)
    except (KeyError, AttributeError, TypeError):
      raise app.UsageError(f"--grid {axis}: the config has no field {field!r}.") from None
    if not values:
      raise app.UsageError(f"--grid {axis}: expected {field}=value,value,...")
    parsed.append([(field, v) for v in values.split(",")])
  return list(itertools.product(*parsed))


def run_command(config_file: str, run: Run, overrides: list[str], run_args: str) -> list[str]:
  point = [f"--config.{k}={v}" for k, v in run.point]
  return [sys.executable, "-m", "gml_jax.runner.main", f"--config={config_file}:{run.method}",
          f"--workdir={run.workdir}", *overrides, *point, f"--config.seed={run.seed}",
          *shlex.split(run_args)]


def execute(runs: list[Run], command, parallel: int, writer: bool = True) -> None:
  """Runs every pending run (``parallel`` at a time), printing a line per run started,
  finished, failed or skipped, with the time left estimated from the runs done so far.
  A run is finished when it exits with status 0 and (on the ``writer``, whose runs are
  process 0 of their jobs and write the summaries) has written its summary."""
  total = len(runs)
  todo = []
  for i, run in enumerate(runs):
    if run.summary() is not None:
      run.status = "skipped"
      print(f"[{i + 1}/{total}] skipped {run.name}: finished before", flush=True)
    else:
      todo.append((i, run))
  running, durations = [], []
  while todo or running:
    while todo and len(running) < parallel:
      i, run = todo.pop(0)
      run.workdir.mkdir(parents=True, exist_ok=True)
      log = run.log.open("a")
      proc = subprocess.Popen(command(run), stdout=log, stderr=subprocess.STDOUT,
                              env=os.environ | {"PYTHONUNBUFFERED": "1"})
      running.append((i, run, proc, log, time.perf_counter()))
      print(f"[{i + 1}/{total}] started {run.name}", flush=True)
    time.sleep(0.2)
    for entry in [e for e in running if e[2].poll() is not None]:
      running.remove(entry)
      i, run, proc, log, started = entry
      log.close()
      run.seconds = time.perf_counter() - started
      durations.append(run.seconds)
      left = (len(todo) + len(running)) * float(np.mean(durations)) / parallel
      if proc.returncode == 0 and (run.summary() is not None or not writer):
        run.status = "finished"
        print(f"[{i + 1}/{total}] finished {run.name} in {run.seconds:.0f} s; about "
              f"{_minutes(left)} left", flush=True)
      else:
        run.status = "failed"
        print(f"[{i + 1}/{total}] FAILED {run.name} (exit {proc.returncode}); log: {run.log}",
              flush=True)


def _process_id(run_args: str) -> int:
  """The process id the runs have in their multi-process jobs (0 when not given)."""
  ids = [a.split("=", 1)[1] for a in shlex.split(run_args) if a.startswith("--process_id=")]
  return int(ids[-1]) if ids else 0


def _minutes(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_file = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
  overrides = [f"--config.{k}={v if isinstance(v, str) else repr(v)}"
               for k, v in config_flags.get_override_values(flags.FLAGS["config"]).items()]
  unknown = [m for m in _METHODS.value if m not in VARIANTS]
  if unknown:
    raise app.UsageError(f"Unknown methods {unknown}; expected some of {VARIANTS}.")
  workdir = pathlib.Path(_WORKDIR.value).expanduser().resolve()
  points = parse_grid(_GRID.value, config)
  process = _process_id(_RUN_ARGS.value)
  runs = []
  for point in points:
    base = workdir.joinpath(*[f"{k}={v}" for k, v in point])
    runs += [Run(m, s, point, base / m / f"seed_{s}",
                 log_name=f"run.{process}.log" if process else "run.log")
             for m in _METHODS.value for s in parse_seeds(_SEEDS.value)]
  print(f"Study of {config.experiment}: {len(_METHODS.value)} methods x "
        f"{len(parse_seeds(_SEEDS.value))} seeds x {len(points)} grid points = {len(runs)} "
        f"runs in {workdir}", flush=True)
  started = time.perf_counter()
  writer = process == 0  # the host whose runs write the summaries writes the aggregate
  execute(runs, lambda run: run_command(config_file, run, overrides, _RUN_ARGS.value),
          _PARALLEL.value, writer)
  failed = [r for r in runs if r.status == "failed"]
  if not writer:
    print("The runs are done; the study of process 0 writes the aggregate.")
    sys.exit(1 if failed else 0)
  done = [r for r in runs if r.status in ("finished", "skipped")]
  result = study_report.aggregate([{"method": r.method, "seed": r.seed, "point": r.point_label,
                       "summary": r.summary()} for r in done])
  result |= {
      "experiment": config.experiment,
      "command": " ".join(["python -m gml_jax.runner.study", *sys.argv[1:]]),
      "wall_seconds": time.perf_counter() - started,
      "runs": [{"method": r.method, "seed": r.seed, "point": r.point_label, "status": r.status,
                "workdir": str(r.workdir), "seconds": r.seconds} for r in runs],
  }
  atomic_write(workdir / "study.json", json.dumps(result, indent=2))
  atomic_write(workdir / "study.md", study_report.markdown(result))
  if done:
    study_report.plots(result, {r.workdir: r for r in done}, workdir / "plots")
  print("\n" + study_report.markdown(result))
  for r in failed:
    print(f"FAILED: {r.name}; log: {r.log}")
  print(f"\nStudy: {workdir}/study.json, study.md, plots/")
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
