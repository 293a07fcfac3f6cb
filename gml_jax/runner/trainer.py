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
  <method>.png (the method's own metrics, e.g. OGM-GE's ratios and coefficients),
  accuracy.png (per-branch train/validation accuracy), utilization.png (models with fusion
  layers).

Running again with the same workdir resumes from the latest checkpoint: all randomness is
a function of (seed, step), so the resumed run continues exactly where it stopped; a
finished run is not run again (its summary is returned, no file changes), once its
config.json, or without one the config digest saved with its checkpoint, confirms that it is
this config's run (otherwise one line says why, and nothing is written). A run locks its
workdir (``lock.json``): a second run on it stops at once, writing nothing there. SIGTERM
or SIGINT stops a run at the next metrics fetch with a checkpoint; a diverged (NaN/inf) loss
stops it without one, keeping the last good checkpoint. On a bucket that cannot be reached,
a save is retried (:func:`~gml_jax.runner.storage.with_retries`; docs/tutorials/fault_messages.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
from typing import Any, Callable

import grain
import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from gml_jax import epochs
from gml_jax.balancing import BalanceState, find_balance_state
from gml_jax.extras import metric_keys
from gml_jax.parallel import compile_eval_step, compile_multi_step, compile_train_step, data_mesh
from gml_jax.pmr import make_prototype_step, prototype_pass
from gml_jax.runner import build, methods, names, pipeline, plots, storage
from gml_jax.runner import dataset as datasets
from gml_jax.runner.checkpoints import Checkpoints, Progress
from gml_jax.runner.evaluation import (
  evaluate,
  final_summary,
  speed_util_correlation,
  utilization_rates,
)
from gml_jax.runner.failure import read_json
from gml_jax.runner.logs import EpochSums, RunLogs, epoch_row
from gml_jax.runner.loop import MetricFetcher, TrainClock, due_at
from gml_jax.runner.schedule import end_of_epoch, learning_rate
from gml_jax.runner.workdir import (
  WorkdirLock,
  atomic_write,
  check_finished_workdir,
  check_workdir_config,
  config_digest,
  refuse_link,
  refuse_linked_folders,
  write_config,
)
from gml_jax.steps import make_eval_step, make_multi_step, make_train_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: int | None = None,
                       clock: TrainClock | None = None) -> dict | None:
  """Trains and evaluates ``config`` in ``workdir``; returns the summary, or None when the
  run stopped early (``stop_after_steps``, SIGTERM or SIGINT) after a checkpoint.
  ``clock`` (a :class:`~gml_jax.runner.loop.TrainClock`) times the run's sections for a
  caller that wants to know where the time went."""
  workdir = storage.path(workdir)
  is_writer = jax.process_index() == 0
  clock = clock if clock is not None else TrainClock()

  # ---- Everything that can reject the config comes before anything is written.
  build.check_config(config)
  dataset = datasets.open_dataset(config.data)
  spe = pipeline.steps_per_epoch(dataset.sources["train"], config.batch_size)
  model = build.model(config, dataset.num_classes)
  tx = build.optimizer(config, spe, dataset.num_classes,
                       lambda: build.feature_dims(model, dataset.example_inputs()))
  if (workdir / "summary.json").exists():  # finished: nothing to do, nothing to change
    check_finished_workdir(workdir, config, dataset.used())  # its config confirmed first
    refuse_link(workdir / "summary.json")
    return read_json(workdir / "summary.json")

  with contextlib.ExitStack() as cleanup:  # released and closed however the run ends
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir)
    lock.acquire()
    cleanup.callback(lock.release)
    refuse_linked_folders(workdir)  # before orbax or the logs create anything through one
    check_workdir_config(workdir, config, dataset.used())

    # ---- State, compiled steps, and the run so far.
    mesh = data_mesh()
    example = dataset.example_inputs()
    state = build.initial_state(config, model, tx, example, mesh)
    loss = build.loss(config)
    with clock.section("compile"):
      train_step, multi_step = _compiled_steps(config, model, tx, loss, state, example, mesh)
    checkpoints = Checkpoints(workdir, config_digest(config, dataset.used()))
    cleanup.callback(checkpoints.close)
    progress = Progress()
    if checkpoints.latest.latest_step() is not None:
      state, progress = checkpoints.restore(checkpoints.latest, state)
      print(f"Resuming {workdir} from step {progress.step}.")
    if is_writer:  # only now: a checkpoint of another config has been refused above
      write_config(workdir, config, dataset.used())
    logs = RunLogs(workdir, progress.step, write=is_writer, config=config.to_dict())
    cleanup.push(lambda kind, *_: None if kind is storage.StorageUnavailableError  # unwritable
                 else logs.close())
    run = Run(config, workdir, dataset, spe, mesh, model, train_step=train_step,
              multi_step=multi_step,
              eval_step=compile_eval_step(make_eval_step(model, loss), mesh),
              checkpoints=checkpoints, progress=progress, logs=logs, clock=clock, lock=lock)

    state = train(run, state, stop_after_steps)
    if state is None:
      return None

    return _finish(run, state, tx_templates=_method_templates(state))


def _finish(run: Run, state, tx_templates: dict[str, str]) -> dict:
  """The final evaluation with the best checkpoint (chosen on validation accuracy): the
  summary, written with the run's plots by process 0."""
  config, checkpoints, logs = run.config, run.checkpoints, run.logs
  rebalance_steps = _rebalance_steps(state, len(config.data.modalities))
  state, _ = checkpoints.restore(checkpoints.best, state)
  summary = final_summary(config, run.model, run.eval_step, state, run.split_batches,
                          run.dataset.source_name, run.progress, rebalance_steps)
  correlation = speed_util_correlation(logs.epochs.rows())
  if correlation is not None:
    summary[names.SPEED_UTIL_CORRELATION] = correlation
  summary[names.COMPILE_SECONDS] = run.clock.sections["compile"]  # this session's
  if "epoch passes" in run.clock.sections:  # only where a transform has an epoch hook
    summary[names.EPOCH_PASS_SECONDS] = run.clock.sections["epoch passes"]  # this session's
  summary |= _step_means(logs.steps.rows(), tx_templates, config.data.modalities)
  summary["data"] = run.dataset.used()
  if jax.process_index() == 0:
    logs.add_summary(summary)
    atomic_write(run.workdir / "summary.json", json.dumps(summary, indent=2))
    plots.write_run_plots(run.workdir / "plots", logs.steps.rows(), logs.epochs.rows(),
                          summary, tx_templates)
  return summary


def _compiled_steps(config, model, tx, loss, state, example, mesh):
  """The train step and, for ``steps_per_call`` > 1, the multi-step, compiled ahead of the
  first batch (so that training time excludes compilation)."""
  step_fn = make_train_step(model, tx, compute_dtype=config.model.dtype, loss=loss)
  k = config.steps_per_call
  spec = lambda steps=None: pipeline.batch_spec(example, config.batch_size, mesh, steps)
  train_step = compile_train_step(step_fn, mesh).lower(state, spec()).compile()
  multi_step = None if k == 1 else compile_multi_step(make_multi_step(step_fn, k), mesh).lower(
      state, spec(k)).compile()
  return train_step, multi_step


def _method_templates(state) -> dict[str, str]:
  """The metrics the method's own transforms declare (the balancing transform's, which
  measures the speeds in every run with fusion layers, have speeds.png)."""
  return {k: t for k, t in metric_keys(state.opt_state).items() if k not in BalanceState.METRICS}


def _step_means(rows: list[dict], templates: dict[str, str], modalities) -> dict:
  """The run's mean over its steps of every metric its method declares (the study's
  tables and study.json carry them)."""
  keys = names.method_step_keys(modalities, templates)
  values = {k: [r[k] for r in rows if k in r] for k in keys}
  return {names.step_mean(k): float(np.mean(v)) for k, v in values.items() if v}


def _rebalance_steps(state, num_modalities: int) -> list[int]:
  """Re-balancing steps taken for each modality (the balancing state counts them; zeros
  where the optimizer does not balance)."""
  balance = find_balance_state(state.opt_state)
  if balance is None:
    return [0] * num_modalities
  return [int(n) for n in jax.device_get(balance.rebalance_steps)]


@dataclasses.dataclass
class Run:
  """What the training loop works with."""

  config: ml_collections.ConfigDict
  workdir: storage.Path
  dataset: datasets.Dataset
  steps_per_epoch: int
  mesh: Any
  model: Any
  train_step: Callable
  multi_step: Callable | None
  eval_step: Callable
  checkpoints: Checkpoints
  progress: Progress
  logs: RunLogs
  clock: TrainClock
  lock: WorkdirLock
  cache: dict = dataclasses.field(default_factory=dict)  # compiled helpers built on demand

  def step(self, size: int) -> Callable:
    """The compiled call that takes ``size`` steps."""
    return self.multi_step if size > 1 else self.train_step

  def epoch_batches(self, stop_after_steps: int | None):
    """(size, batch) of the calls from the current step to the end of its epoch."""
    c, step = self.config, self.progress.step
    epoch, start = divmod(step, self.steps_per_epoch)
    plan = pipeline.call_plan(step, c.steps_per_call, self.steps_per_epoch,
                              c.checkpoint_every_steps, stop_after_steps)
    return pipeline.train_batches(self.dataset.sources["train"], self.dataset.prep,
                                  c.batch_size, c.seed, epoch, start, plan, self.mesh)

  def split_batches(self, split: str):
    """A split's batches placed on the mesh (None if the dataset has no such split)."""
    sources = self.dataset.sources
    return (pipeline.eval_batches(sources[split], self.dataset.prep,
                                  self.config.eval_batch_size, self.mesh, f"evaluating {split}")
            if split in sources else None)

  def utilization_train_batches(self):
    """The training examples whose means stand in for a dropped modality in the per-epoch
    utilization: the first ``utilization_train_examples`` of the split (0: all)."""
    source, first = self.dataset.sources["train"], self.config.utilization_train_examples
    if first:
      source = grain.MapDataset.source(source)[:first]
    return pipeline.eval_batches(source, self.dataset.prep, self.config.eval_batch_size,
                                 self.mesh, "utilization means")

  def save(self, manager, state) -> None:
    """A checkpoint of ``state`` with the progress and the training time so far; the logs
    reach the workdir first (on a bucket they wait in memory until then). On a bucket out
    of reach, retried (:func:`~gml_jax.runner.storage.with_retries`)."""
    self.lock.check()
    self.progress.train_seconds = self.clock.seconds()

    current = [manager]

    def attempt(tried: int) -> None:
      if tried:  # what the failed save left: the steps on the bucket read again
        current[0] = self.checkpoints.renewed(current[0])
      self.logs.flush()
      self.checkpoints.save(current[0], state, self.progress)

    with self.clock.section("checkpoint saves"):
      storage.with_retries(self.workdir, f"saving the checkpoint of step {self.progress.step}",
                           attempt, self._resume_hint, lambda line: tqdm.write(line))

  def _resume_hint(self) -> str:
    """What a run that cannot save is left with, and how to go on."""
    step = self.checkpoints.latest_saved
    if step is None:
      return ("No checkpoint had been written yet: run the same command again once the "
              "bucket is back.")
    return (f"The last checkpoint (step {step}) in {self.workdir / 'checkpoints' / 'latest'} is "
            "intact: run the same command again once the bucket is back, to resume from it.")


def train(run: Run, state, stop_after_steps: int | None):
  """The training loop; returns the final state, or None when it stopped early (with a
  checkpoint)."""
  config, progress, clock = run.config, run.progress, run.clock
  total_steps = config.num_epochs * run.steps_per_epoch
  fetcher = MetricFetcher(config.data.modalities,
                          names.STEP_METRICS | metric_keys(state.opt_state))
  bar = tqdm(total=total_steps, initial=progress.step, unit="step", desc=config.experiment,
             disable=jax.process_index() != 0)
  clock.start(progress.train_seconds)
  # The bar closes however the loop ends, so that an error is the console's last line.
  with bar, StopSignal() as stop_signal:
    while progress.step < total_steps:
      if progress.step % run.steps_per_epoch == 0:  # an epoch begins (not a resumed one)
        state = _start_epoch(run, state)
      for size, batch in clock.timed("waiting for batches", run.epoch_batches(stop_after_steps)):
        with clock.section("step calls"):
          state, metrics = run.step(size)(state, batch)
        fetcher.add(metrics, size)
        progress.step += size
        bar.update(size)
        due = due_at(progress.step, fetcher.unfetched_steps,
                     steps_per_epoch=run.steps_per_epoch, log_every=config.log_every_steps,
                     checkpoint_every=config.checkpoint_every_steps, stop_after=stop_after_steps)
        if not due.fetch:
          continue
        preempted = stop_signal.agreed()  # a collective: every process fetches here
        with clock.section("metric fetches"):
          rows = fetcher.fetch(progress.step, sync=due.sync or preempted)
        if rows:
          _record(run, rows, bar)
        if due.epoch_end:
          state, finished = _end_epoch(run, state)
          if finished:  # early stop: a full checkpoint, then the final evaluation
            run.save(run.checkpoints.latest, state)
            return state
        if due.checkpoint or due.stop or preempted:
          run.save(run.checkpoints.latest, state)
        if due.stop or preempted:
          bar.close()  # before the message, so that it stands on its own line
          why = "a stop signal" if preempted else f"--stop_after_steps={stop_after_steps}"
          print(f"Stopped by {why} at step {progress.step}; checkpoint saved in "
                f"{run.workdir}. Run the same command again to resume.")
          return None
  return state


_EPOCH_START = jax.jit(epochs.epoch_start)


def _start_epoch(run: Run, state):
  """The transforms' epoch hooks (:mod:`gml_jax.epochs`: InfoReg's anchor, PMR's prototypes
  from a pass over a share of the training split, timed apart as "epoch passes"), before
  every epoch's first step. A run resumed mid-epoch has its hooked state in the checkpoint,
  and a run stopped at an epoch's end has not run the next hook yet: resumes are exact."""
  needs = epochs.epoch_needs(state.opt_state)
  if not needs:
    return state
  with run.clock.section("epoch passes"):
    inputs = {"params": state.params} if "params" in needs else {}
    if "prototype_sums" in needs:
      inputs["prototype_sums"] = prototype_pass(
          _prototype_step(run), state.variables, _epoch_pass_batches(run))
    return state.replace(opt_state=_EPOCH_START(state.opt_state, **inputs))


def _prototype_step(run: Run):
  if "prototype_step" not in run.cache:
    run.cache["prototype_step"] = jax.jit(make_prototype_step(run.model,
                                                              run.dataset.num_classes))
  return run.cache["prototype_step"]


def _epoch_pass_batches(run: Run):
  """The epoch pass's batches: the method's share (its registration's ``epoch_share``) of
  the training split, drawn afresh each epoch from the run's seed, in evaluation mode."""
  config, epoch = run.config, run.progress.step // run.steps_per_epoch
  method = methods.get(config.balance.method)
  options = method.defaults()
  options.update(config.balance.get(method.name, {}))
  share = method.epoch_share(options) if method.epoch_share else 1.0
  source = grain.MapDataset.source(run.dataset.sources["train"])
  count = max(1, int(share * len(source)))
  subset = source.shuffle(seed=config.seed * 1000003 + epoch)[:count]
  return pipeline.eval_batches(subset, run.dataset.prep, config.eval_batch_size, run.mesh)


def _record(run: Run, rows: list[dict], bar) -> None:
  """Fetched step rows: to the logs, the epoch's sums and the progress bar; a non-finite
  loss stops the run before anything saves its state."""
  last = rows[-1]
  bar.set_postfix({names.LOSS: f"{last[names.LOSS]:.3f}", "acc": f"{last[names.ACCURACY]:.2f}"}
                  | ({names.D_SPEED: f"{last[names.D_SPEED]:+.3f}"} if names.D_SPEED in last
                     else {}))
  run.logs.add_steps(rows)
  run.progress.epoch_sums.add(rows, run.config.data.modalities)
  check_finite(rows, run.workdir, run.checkpoints.latest.latest_step())


def _end_epoch(run: Run, state):
  """Validation, the epoch's row, the best checkpoint, the schedule and the early stop.
  Returns (state, whether training is finished)."""
  progress, step = run.progress, run.progress.step
  with run.clock.section("evaluation"):
    val = evaluate(run.eval_step, state, run.split_batches("validation"),
                   run.config.data.modalities)
    row = epoch_row(step // run.steps_per_epoch, step, progress.epoch_sums, val) | {
        names.LEARNING_RATE: learning_rate(state.opt_state)}
    if run.config.utilization_every_epoch and run.config.model.fusion == "mmtm":
      with run.clock.section("epoch utilization"):
        rates = utilization_rates(run.model, state, run.utilization_train_batches(),
                                  list(run.split_batches("validation")), val,
                                  run.config.data.modalities)
      row |= {names.val(k): v for k, v in rates.items()}
    progress.epoch_sums = EpochSums()
    run.logs.add_epoch(row)
    if val[names.ACCURACY] > progress.best_val_accuracy:
      progress.best_val_accuracy, progress.best_step = val[names.ACCURACY], step
      run.save(run.checkpoints.best, state)
    return end_of_epoch(run.config, state, row, progress, run.mesh)


# --------------------------------------------------------------------------------------
# Calls, checks and signals


def check_finite(rows: list[dict], workdir: storage.Path, last_checkpoint) -> None:
  bad = next((r for r in rows if not np.isfinite(r[names.LOSS])), None)
  if bad is not None:
    kept = (f"the last good checkpoint (step {last_checkpoint}) is kept in "
            f"{workdir / 'checkpoints' / 'latest'}" if last_checkpoint is not None
            else "no checkpoint had been written yet")
    raise FloatingPointError(
        f"The training loss is {bad[names.LOSS]} at step {bad[names.STEP]}: stopped without saving "
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
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))
