"""The experiment trainer: ``train_and_evaluate(config, workdir)``.

A run leaves in its workdir:

* ``config.json``: the resolved config (a workdir of another config is refused);
* ``metrics/steps.jsonl`` (every step: loss, accuracies, target; μ, s_k and d_speed where
  the model has fusion layers; OGM-GE's ratios and coefficients where it modulates) and
  ``metrics/epochs.jsonl`` (train and validation accuracy per branch), with CSV copies, and
  TensorBoard event files in ``tensorboard/`` (step scalars once per metrics fetch);
* ``checkpoints/latest`` and ``checkpoints/best`` (best validation accuracy; never test):
  orbax checkpoints of the whole train state (parameters, BatchNorm statistics, fusion
  running means, optimizer and balancing state) and the run's progress;
* ``summary.json``: test accuracy of ŷ and of each branch, ``test_biased`` accuracy,
  conditional utilization rates and d_util, share of re-balancing steps per modality,
  wall time and samples/s (all from the best checkpoint);
* ``plots/``: speeds.png (s_0, s_1, d_speed with re-balancing steps marked),
  modulation.png (OGM-GE), accuracy.png (per-branch train/validation accuracy),
  utilization.png (models with fusion layers).

Running again with the same workdir resumes from the latest checkpoint: all randomness is
a function of (seed, step), so the resumed run continues exactly where it stopped; a
finished run is not run again (its summary is returned, no file changes). A run locks its
workdir (``lock.json``): a second run on it stops at once. SIGTERM or SIGINT stops a run at
the next metrics fetch with a checkpoint; a diverged (NaN/inf) loss stops it without one,
keeping the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from gml_jax.runner import build, dataset as datasets, pipeline, plots
from gml_jax.runner.checkpoints import Checkpoints, Progress
from gml_jax.runner.evaluation import evaluate, final_summary
from gml_jax.runner.logs import RunLogs, epoch_row, step_rows
from gml_jax.runner.schedule import end_of_epoch, learning_rate
from gml_jax.runner.failure import read_json
from gml_jax.runner.workdir import (WorkdirLock, atomic_write, check_workdir_config,
                                    config_digest, refuse_link, write_config)
from gml_jax.steps import (compile_eval_step, compile_multi_step, compile_train_step,
                           data_mesh, make_eval_step, make_multi_step, make_train_step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: int | None = None) -> dict | None:
  """Trains and evaluates ``config`` in ``workdir``; returns the summary, or None when the
  run stopped early (``stop_after_steps``, SIGTERM or SIGINT) after a checkpoint."""
  workdir = pathlib.Path(workdir).expanduser().resolve()
  is_writer = jax.process_index() == 0

  # ---- Everything that can reject the config comes before anything is written.
  build.check_config(config)
  dataset = datasets.open_dataset(config.data)
  spe = pipeline.steps_per_epoch(dataset.sources["train"], config.batch_size)
  model = build.model(config, dataset.num_classes)
  tx = build.optimizer(config, spe)
  if (workdir / "summary.json").exists():  # finished: nothing to do, nothing to change
    check_workdir_config(workdir, config, dataset.used())
    refuse_link(workdir / "summary.json")
    return read_json(workdir / "summary.json")

  with contextlib.ExitStack() as cleanup:  # released and closed however the run ends
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir)
    lock.acquire()
    cleanup.callback(lock.release)
    check_workdir_config(workdir, config, dataset.used())

    # ---- State, steps, and the run so far.
    mesh = data_mesh()
    example = dataset.example_inputs()
    state = build.initial_state(config, model, tx, example, mesh)
    step_fn = make_train_step(model, tx, compute_dtype=config.model.dtype,
                              loss=build.loss(config))
    k = config.steps_per_call
    spec = lambda steps=None: pipeline.batch_spec(example, config.batch_size, mesh, steps)
    started = time.perf_counter()  # compiled ahead, so that training time excludes it
    train_step = compile_train_step(step_fn, mesh).lower(state, spec()).compile()
    multi_step = None if k == 1 else compile_multi_step(make_multi_step(step_fn, k), mesh).lower(
        state, spec(k)).compile()
    compile_seconds = time.perf_counter() - started
    run = Run(config, workdir, dataset, spe, mesh, train_step=train_step, multi_step=multi_step,
              eval_step=compile_eval_step(make_eval_step(model, build.loss(config)), mesh),
              checkpoints=Checkpoints(workdir, config_digest(config, dataset.used())))
    cleanup.callback(run.checkpoints.close)
    if run.checkpoints.latest.latest_step() is not None:
      state, run.progress = run.checkpoints.restore(run.checkpoints.latest, state)
      print(f"Resuming {workdir} from step {run.progress.step}.")
    if is_writer:  # only now: a checkpoint of another config has been refused above
      write_config(workdir, config, dataset.used())
    # Every process reads the logs (decisions at epoch ends use them); process 0 writes.
    run.logs = RunLogs(workdir, run.progress.step, write=is_writer)
    cleanup.callback(run.logs.close)

    state = train(run, state, stop_after_steps)
    if state is None:
      return None

    # ---- Final evaluation with the best checkpoint (chosen on validation accuracy).
    state, _ = run.checkpoints.restore(run.checkpoints.best, state)
    summary = final_summary(config, model, run.eval_step, state, run.split_batches,
                            dataset.source_name, run.progress, run.logs.steps.rows)
    summary["compile_seconds"] = compile_seconds  # this session's (not in train_seconds)
    summary["data"] = dataset.used()
    if is_writer:
      atomic_write(workdir / "summary.json", json.dumps(summary, indent=2))
      plots.write_run_plots(workdir / "plots", run.logs.steps.rows, run.logs.epochs.rows,
                            summary)
    return summary


@dataclasses.dataclass
class Run:
  """What the training loop works with."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  dataset: datasets.Dataset
  steps_per_epoch: int
  mesh: Any
  train_step: Callable
  multi_step: Callable | None
  eval_step: Callable
  checkpoints: Checkpoints
  progress: Progress = dataclasses.field(default_factory=Progress)
  logs: RunLogs | None = None

  def split_batches(self, split: str):
    """A split's batches placed on the mesh (None if the dataset has no such split)."""
    sources = self.dataset.sources
    return (pipeline.eval_batches(sources[split], self.dataset.prep,
                                  self.config.eval_batch_size, self.mesh, f"evaluating {split}")
            if split in sources else None)


def train(run: Run, state, stop_after_steps: int | None):
  """The training loop; returns the final state, or None when it stopped early (with a
  checkpoint)."""
  config, progress, logs, checkpoints = run.config, run.progress, run.logs, run.checkpoints
  spe, total_steps = run.steps_per_epoch, config.num_epochs * run.steps_per_epoch
  is_writer = jax.process_index() == 0
  pending = []  # (metrics, steps) of the calls since metrics last reached the host
  started = time.perf_counter()
  bar = tqdm(total=total_steps, initial=progress.step, unit="step", desc=config.experiment,
             disable=not is_writer)
  # The bar closes however the loop ends, so that an error is the console's last line.
  with bar, StopSignal() as stop_signal:
    while progress.step < total_steps:
      epoch, start = divmod(progress.step, spe)
      plan = pipeline.call_plan(progress.step, config.steps_per_call, spe,
                       config.checkpoint_every_steps, stop_after_steps)
      for size, batch in pipeline.train_batches(run.dataset.sources["train"], run.dataset.prep,
                                                config.batch_size, config.seed, epoch, start,
                                                plan, run.mesh):
        state, metrics = (run.multi_step if size > 1 else run.train_step)(state, batch)
        pending.append((metrics, size))
        progress.step += size
        bar.update(size)
        step = progress.step
        at_epoch_end = step % spe == 0
        checkpoint_due = at_epoch_end or (
            config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
        stop_asked = stop_after_steps is not None and step >= stop_after_steps
        # Metrics reach the host here, and only here: every checkpoint follows a check
        # that the loss is finite, so a diverged state is never saved.
        if not (checkpoint_due or stop_asked
                or sum(n for _, n in pending) > config.log_every_steps):
          continue
        preempted = stop_signal.agreed()
        # A log alone leaves the last call's metrics for the next fetch: the device runs
        # that call while the host writes the rows, instead of waiting for the next one.
        sync = checkpoint_due or stop_asked or preempted
        ready, pending = (pending, []) if sync else (pending[:-1], pending[-1:])
        if not ready:  # one call of more steps than log_every_steps: fetched next time
          continue
        rows = step_rows(ready, step - sum(n for _, n in pending), config.data.modalities)
        bar.set_postfix({"loss": f"{rows[-1]['loss']:.3f}", "acc": f"{rows[-1]['accuracy']:.2f}"}
                        | ({"d_speed": f"{rows[-1]['d_speed']:+.3f}"} if "d_speed" in rows[-1]
                           else {}))
        logs.add_steps(rows)
        check_finite(rows, run.workdir, checkpoints.latest.latest_step())
        if at_epoch_end:
          progress.train_seconds += time.perf_counter() - started
          val = evaluate(run.eval_step, state, run.split_batches("validation"),
                         config.data.modalities)
          this_epoch = [r for r in logs.steps.rows if step - spe < r["step"] <= step]
          row = epoch_row(epoch + 1, step, this_epoch, val) | {
              "learning_rate": learning_rate(state.opt_state)}
          logs.add_epoch(row)
          if val["accuracy"] > progress.best_val_accuracy:
            progress.best_val_accuracy, progress.best_step = val["accuracy"], step
            checkpoints.save(checkpoints.best, state, progress)
          state, finished = end_of_epoch(config, state, row, progress, run.mesh)
          if finished:  # early stop: a full checkpoint, then the final evaluation
            checkpoints.save(checkpoints.latest, state, progress)
            return state
          started = time.perf_counter()
        if checkpoint_due or stop_asked or preempted:  # saving is not training time
          progress.train_seconds += time.perf_counter() - started
          checkpoints.save(checkpoints.latest, state, progress)
          started = time.perf_counter()
        if stop_asked or preempted:
          bar.close()  # before the message, so that it stands on its own line
          why = "a stop signal" if preempted else f"--stop_after_steps={stop_after_steps}"
          print(f"Stopped by {why} at step {step}; checkpoint saved in {run.workdir}. "
                "Run the same command again to resume.")
          return None
  return state


# --------------------------------------------------------------------------------------
# Calls, checks and signals


def check_finite(rows: list[dict], workdir: pathlib.Path, last_checkpoint) -> None:
  bad = next((r for r in rows if not np.isfinite(r["loss"])), None)
  if bad is not None:
    kept = (f"the last good checkpoint (step {last_checkpoint}) is kept in "
            f"{workdir / 'checkpoints' / 'latest'}" if last_checkpoint is not None
            else "no checkpoint had been written yet")
    raise FloatingPointError(
        f"The training loss is {bad['loss']} at step {bad['step']}: stopped without saving "
        f"this state; {kept}. Lower optimizer.learning_rate, or check the data.")


class StopSignal:
  """Turns SIGTERM and SIGINT into a request to stop at the next safe point (a checkpoint
  is written there); a second signal acts as usual, so Ctrl-C twice still interrupts."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    signal.signal(signum, self._previous[signum])

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self) -> bool:
    """Whether any process was asked to stop (every process calls this at the same steps)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))
