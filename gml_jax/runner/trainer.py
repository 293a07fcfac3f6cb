"""The experiment trainer: ``train_and_evaluate(config, workdir)``.

A run leaves in its workdir:

* ``config.json``: the resolved config (a workdir of another config is refused);
* ``metrics/steps.jsonl`` (every step: loss, accuracies, μ, s_k, d_speed, target) and
  ``metrics/epochs.jsonl`` (train and validation accuracy per branch), with CSV copies, and
  TensorBoard event files in ``tensorboard/``;
* ``checkpoints/latest`` and ``checkpoints/best`` (best validation accuracy; never test):
  orbax checkpoints of the whole train state (parameters, BatchNorm statistics, fusion
  running means, optimizer and balancing state) and the run's progress;
* ``summary.json``: test accuracy of ŷ and of each branch, ``test_biased`` accuracy,
  conditional utilization rates and d_util, share of re-balancing steps per modality,
  wall time and samples/s (all from the best checkpoint);
* ``plots/``: speeds.png (s_0, s_1, d_speed with re-balancing steps marked),
  accuracy.png (per-branch train/validation accuracy), utilization.png.

Running again with the same workdir resumes from the latest checkpoint: all randomness is
a function of (seed, step), so the resumed run continues exactly where it stopped. SIGTERM
or SIGINT stops a run at the next metrics fetch with a checkpoint; a diverged (NaN/inf)
loss stops it without one, keeping the last good checkpoint.
"""

from __future__ import annotations

import json
import pathlib
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from gml_jax.runner import build, pipeline, plots
from gml_jax.runner.evaluation import evaluate, final_summary
from gml_jax.runner.schedule import end_of_epoch, learning_rate
from gml_jax.runner.workdir import (Checkpoints, Progress, RunLogs, atomic_write,
                                    check_workdir_config)
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
  dataset = pipeline.open_dataset(config.data)
  sources, prep = dataset.sources, dataset.prep
  spe = pipeline.steps_per_epoch(sources["train"], config.batch_size)
  total_steps = config.num_epochs * spe
  model = build.model(config, dataset.num_classes, len(prep.modalities))
  tx = build.optimizer(config, spe)
  workdir.mkdir(parents=True, exist_ok=True)
  check_workdir_config(workdir, config, write=is_writer)

  # ---- State, steps, and the run so far.
  mesh = data_mesh()
  state = build.initial_state(config, model, tx, dataset.example_inputs(), mesh)
  step_fn = make_train_step(model, tx)
  train_step = compile_train_step(step_fn, mesh)
  k = config.steps_per_call
  multi_step = compile_multi_step(make_multi_step(step_fn, k), mesh) if k > 1 else None
  eval_step = compile_eval_step(make_eval_step(model), mesh)
  split_batches = lambda split: (pipeline.eval_batches(
      sources[split], prep, config.eval_batch_size, mesh) if split in sources else None)

  checkpoints = Checkpoints(workdir)
  progress = Progress()
  if checkpoints.latest.latest_step() is not None:
    state, progress = checkpoints.restore(checkpoints.latest, state)
    print(f"Resuming {workdir} from step {progress.step}.")
  # Every process reads the logs (decisions at epoch ends use them); process 0 writes.
  logs = RunLogs(workdir, progress.step, write=is_writer)

  # ---- Training.
  pending = []  # (metrics, steps) of the calls since metrics last reached the host
  started = time.perf_counter()
  bar = tqdm(total=total_steps, initial=progress.step, unit="step", desc=config.experiment,
             disable=not is_writer)
  finished = False
  with StopSignal() as stop_signal:
    while progress.step < total_steps and not finished:
      epoch, start = divmod(progress.step, spe)
      plan = call_plan(progress.step, k, spe, config.checkpoint_every_steps, stop_after_steps)
      for size, batch in pipeline.train_batches(sources["train"], prep, config.batch_size,
                                                config.seed, epoch, start, plan, mesh):
        state, metrics = (multi_step if size > 1 else train_step)(state, batch)
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
        if not (sum(n for _, n in pending) >= config.log_every_steps or checkpoint_due
                or stop_asked):
          continue
        rows = step_rows(pending, step)
        pending = []
        bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", acc=f"{rows[-1]['accuracy']:.2f}",
                        d_speed=f"{rows[-1]['d_speed']:+.3f}")
        logs.add_steps(rows)
        check_finite(rows, workdir, checkpoints.latest.latest_step())
        preempted = stop_signal.agreed()
        if at_epoch_end:
          progress.train_seconds += time.perf_counter() - started
          val = evaluate(eval_step, state, split_batches("validation"))
          this_epoch = [r for r in logs.steps.rows if step - spe < r["step"] <= step]
          row = epoch_row(epoch + 1, step, this_epoch, val) | {
              "learning_rate": learning_rate(state.opt_state)}
          logs.add_epoch(row)
          if val["accuracy"] > progress.best_val_accuracy:
            progress.best_val_accuracy, progress.best_step = val["accuracy"], step
            checkpoints.save(checkpoints.best, state, progress)
          state, finished = end_of_epoch(config, state, row, progress, mesh)
          if finished:  # early stop: a full checkpoint, then the final evaluation
            checkpoints.save(checkpoints.latest, state, progress)
            break
          started = time.perf_counter()
        if checkpoint_due or stop_asked or preempted:
          progress.train_seconds += time.perf_counter() - started
          started = time.perf_counter()
          checkpoints.save(checkpoints.latest, state, progress)
        if stop_asked or preempted:
          bar.close()
          logs.close()
          why = "a stop signal" if preempted else f"--stop_after_steps={stop_after_steps}"
          print(f"Stopped by {why} at step {step}; checkpoint saved in {workdir}. "
                "Run the same command again to resume.")
          return None
  bar.close()

  # ---- Final evaluation with the best checkpoint (chosen on validation accuracy).
  state, _ = checkpoints.restore(checkpoints.best, state)
  summary = final_summary(config, model, eval_step, state, split_batches,
                          len(prep.modalities), dataset.source_name, progress, logs.steps.rows)
  logs.close()
  if is_writer:
    atomic_write(workdir / "summary.json", json.dumps(summary, indent=2))
    plots.write_run_plots(workdir / "plots", logs.steps.rows, logs.epochs.rows, summary)
  return summary


# --------------------------------------------------------------------------------------
# Calls and metric rows


def call_plan(step: int, k: int, spe: int, checkpoint_every: int, stop_after) -> list[int]:
  """The sizes of the train-step calls from ``step`` to the end of its epoch: ``k`` steps
  a call, but single steps up to an epoch end, a checkpoint or a requested stop that a
  call of ``k`` would cross."""
  plan = []
  while step % spe or not plan:
    limits = [k, spe - step % spe]
    if checkpoint_every:
      limits.append(checkpoint_every - step % checkpoint_every)
    if stop_after is not None:
      limits.append(max(stop_after - step, 1))
    size = k if min(limits) == k else 1
    plan.append(size)
    step += size
  return plan


def step_rows(pending: list[tuple[dict, int]], last_step: int) -> list[dict]:
  """Metrics of the calls since the last fetch -> one JSON row per step (one host sync).

  ``pending`` holds (metrics, steps) per call; the metrics of a multi-step call have a
  leading step axis. A row's step is the number of steps done after it (1, 2, ...), as in
  checkpoints; the last is ``last_step``.
  """
  per_step = []
  for metrics, steps in jax.device_get(pending):
    per_step += [metrics] if steps == 1 else [
        jax.tree.map(lambda x, i=i: x[i], metrics) for i in range(steps)]
  first_step = last_step - len(per_step)
  rows = []
  for i, m in enumerate(per_step):
    row = {"step": first_step + i + 1, "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
           "d_speed": float(m["d_speed"]), "target": int(m["target"])}
    for b in range(len(m["speeds"])):
      row |= {f"branch_{b}_accuracy": float(m["branch_accuracy"][b]),
              f"branch_{b}_loss": float(m["branch_loss"][b]),
              f"s_{b}": float(m["speeds"][b]), f"mu_main_{b}": float(m["mu_main"][b]),
              f"mu_fusion_{b}": float(m["mu_fusion"][b])}
    rows.append(row)
  return rows


def epoch_row(epoch: int, step: int, step_rows_: list[dict], val: dict) -> dict:
  """Mean training metrics over the epoch's steps, validation metrics, last speeds."""
  row = {"epoch": epoch, "step": step}
  keys = [k for k in step_rows_[0] if k == "loss" or k.endswith("accuracy")]
  row |= {f"train_{k}": float(np.mean([r[k] for r in step_rows_])) for k in keys}
  row |= {f"val_{k}": v for k, v in val.items()}
  row |= {k: v for k, v in step_rows_[-1].items() if k.startswith("s_") or k == "d_speed"}
  return row


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
