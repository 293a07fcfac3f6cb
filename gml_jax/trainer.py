"""The experiment trainer: ``train_and_evaluate(config, workdir)``.

A run leaves in its workdir:

* ``config.json``: the resolved config (a workdir of another config is refused);
* ``metrics/steps.jsonl`` (every step: loss, accuracies, μ, s_k, d_speed, target) and
  ``metrics/epochs.jsonl`` (train and validation accuracy per branch), with CSV copies, and
  TensorBoard event files in ``tensorboard/``;
* ``checkpoints/latest`` and ``checkpoints/best`` (best validation accuracy; never test):
  orbax checkpoints of the whole train state (parameters, BatchNorm statistics, fusion
  running means, optimizer and balancing state) and the data position;
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

import csv
import json
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from gml_jax import input_pipeline, models, plots
from gml_jax.balancing import balance_state, balanced_multimodal
from gml_jax.train import (TrainState, compile_eval_step, compile_multi_step,
                           compile_train_step, create_train_state, data_mesh, make_eval_step,
                           make_multi_step, make_train_step, replicate, shard_batch,
                           shard_stacked_batches, stack_batches)
from gml_jax.utilization import conditional_utilization

# --------------------------------------------------------------------------------------
# Building blocks from the config


def build_model(config: ml_collections.ConfigDict, num_classes: int, num_modalities: int):
  if config.model.name == "small_cnn":
    return models.fusion_network(lambda: models.small_cnn_stages(config.model.width),
                                 num_modalities, num_classes, fusion_after=(1, 2),
                                 ratio=config.model.ratio)
  if config.model.name == "resnet18":
    return models.fusion_network(models.resnet18_stages, num_modalities, num_classes,
                                 fusion_after=(2, 3, 4), ratio=config.model.ratio)
  if config.model.name == "i3d":
    return models.fusion_network(models.i3d_stages, num_modalities, num_classes,
                                 fusion_after=(3, 4, 5), ratio=config.model.ratio)
  raise ValueError(f"Unknown model.name {config.model.name!r}; expected small_cnn, resnet18 "
                   "or i3d.")


def build_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The configured optimizer inside the balancing transform; its learning rate is a
  hyperparameter in the optimizer state, so a schedule can change it between steps."""
  o = config.optimizer
  if o.name not in ("sgd", "adam"):
    raise ValueError(f"Unknown optimizer.name {o.name!r}; expected sgd or adam.")

  def make_inner(learning_rate):
    if o.name == "sgd":
      inner = optax.sgd(learning_rate, momentum=o.momentum or None)
    else:
      inner = optax.adam(learning_rate)
    if o.weight_decay:
      inner = optax.chain(optax.add_decayed_weights(o.weight_decay), inner)
    return inner

  b = config.balance
  return balanced_multimodal(
      optax.inject_hyperparams(make_inner)(learning_rate=o.learning_rate),
      models.group_labels, method=b.method, alpha=b.alpha, window=b.window,
      warmup_steps=b.warmup_epochs * steps_per_epoch, update=b.update_mode, seed=config.seed)


def learning_rate(opt_state) -> float:
  return float(balance_state(opt_state).inner_state.hyperparams["learning_rate"])


def with_learning_rate(opt_state, value: float, mesh):
  """The optimizer state with a new learning rate (replicated like the rest)."""
  inner = opt_state.inner_state
  hyperparams = dict(inner.hyperparams)
  hyperparams["learning_rate"] = replicate(
      np.asarray(value, np.asarray(hyperparams["learning_rate"]).dtype), mesh)
  return opt_state._replace(inner_state=inner._replace(hyperparams=hyperparams))


def plateau(schedule: ml_collections.ConfigDict, tracker: dict, loss: float,
            lr: float) -> float:
  """Reduce-on-plateau, as PyTorch's ReduceLROnPlateau (mode min, relative threshold):
  after more than ``patience`` epochs whose training loss did not improve on the best by
  a factor (1 - threshold), multiply the learning rate by ``factor`` (not below
  ``min_lr``). ``tracker`` ({"best", "bad_epochs"}) is updated in place; returns the rate."""
  if loss < tracker["best"] * (1 - schedule.threshold):
    tracker.update(best=loss, bad_epochs=0)
    return lr
  tracker["bad_epochs"] += 1
  if tracker["bad_epochs"] > schedule.patience:
    tracker["bad_epochs"] = 0
    return max(lr * schedule.factor, schedule.min_lr)
  return lr


# --------------------------------------------------------------------------------------
# Workdir: config, logs, checkpoints


def check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                         write: bool = True) -> None:
  """Refuses a workdir that holds a run of another config; else writes config.json (when
  ``write``: process 0 only)."""
  path = workdir / "config.json"
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  if path.exists():
    saved = json.loads(path.read_text())
    if saved != current:
      saved, current = _flatten(saved), _flatten(current)
      diff = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
      raise ValueError(
          f"Workdir {workdir} holds a run of another config (differs in: {', '.join(diff)}). "
          "Use a new --workdir, or the same config to resume that run.")
    return
  if write:
    _atomic_write(path, json.dumps(current, indent=2, sort_keys=True))


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _atomic_write(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


class MetricLog:
  """Append-only JSON lines, cut back to the restored step on resume, with a CSV copy.
  Every process keeps the rows; only the one with ``write`` touches the files."""

  def __init__(self, path: pathlib.Path, resume_step: int, write: bool = True):
    self.path, self.write = path, write
    rows = []
    if path.exists():  # rows past the restored checkpoint belong to the lost future
      lines = path.read_text().splitlines()
      rows = [json.loads(l) for l in lines[:-1]] + _parse_last(lines[-1:])
      rows = [r for r in rows if r["step"] <= resume_step]
    if write:
      _atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    self.rows = rows

  def append(self, rows: list[dict]) -> None:
    self.rows += rows
    if self.write:
      with self.path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

  def write_csv(self) -> None:
    if not self.rows or not self.write:
      return
    keys = list(dict.fromkeys(k for r in self.rows for k in r))
    with self.path.with_suffix(".csv").open("w", newline="") as f:
      writer = csv.DictWriter(f, keys)
      writer.writeheader()
      writer.writerows(self.rows)


def _parse_last(lines: list[str]) -> list[dict]:
  """The last row, unless a hard kill cut it short mid-write."""
  try:
    return [json.loads(l) for l in lines]
  except json.JSONDecodeError:
    return []


def _checkpoint_manager(path: pathlib.Path) -> ocp.CheckpointManager:
  # Orbax writes into a temporary directory and renames it when complete: a run killed
  # mid-save leaves the previous checkpoint intact.
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=1))


def _save(manager: ocp.CheckpointManager, state: TrainState, meta: dict) -> None:
  manager.save(int(meta["step"]), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()


def _restore(manager: ocp.CheckpointManager, target: TrainState) -> tuple[TrainState, dict]:
  step = manager.latest_step()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax reports structure/shape mismatches in many ways
    raise ValueError(
        f"Checkpoint {manager.directory}/{step} does not fit this model and optimizer "
        f"(saved by another config or code version?): {e}") from e
  return restored.state, restored.meta


# --------------------------------------------------------------------------------------
# Evaluation


def evaluate(eval_step, state, source, prep, batch_size, mesh) -> dict:
  """Accuracy and loss of ŷ and of each branch over a whole split (normal fusion)."""
  totals = None
  for batch in input_pipeline.eval_batches(source, prep, batch_size):
    sums = eval_step(state, shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  out = {"examples": int(count), "accuracy": float(totals["correct"]) / count,
         "loss": float(totals["loss_sum"]) / count}
  for k, c in enumerate(totals["branch_correct"]):
    out[f"branch_{k}_accuracy"] = float(c) / count
  return out


def _step_rows(pending: list[tuple[dict, int | None]], first_step: int) -> list[dict]:
  """Metrics of the calls since the last fetch -> one JSON row per step (one host sync).

  ``pending`` holds (metrics, steps) per call; ``steps`` is None for a single-step call and
  the length of the leading step axis for a multi-step call. A row's step is the number of
  steps done after it (1, 2, ...), as in checkpoints.
  """
  per_step = []
  for metrics, steps in jax.device_get(pending):
    per_step += [metrics] if steps is None else [
        jax.tree.map(lambda x, i=i: x[i], metrics) for i in range(steps)]
  rows = []
  for i, m in enumerate(per_step):
    row = {"step": first_step + i + 1, "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
           "d_speed": float(m["d_speed"]), "target": int(m["target"])}
    for k in range(len(m["speeds"])):
      row |= {f"branch_{k}_accuracy": float(m["branch_accuracy"][k]),
              f"s_{k}": float(m["speeds"][k]), f"mu_main_{k}": float(m["mu_main"][k]),
              f"mu_fusion_{k}": float(m["mu_fusion"][k])}
    rows.append(row)
  return rows


def _call_size(step: int, k: int, spe: int, checkpoint_every: int, stop_after) -> int:
  """Steps the next call may take: ``k``, unless an epoch end, a checkpoint or a requested
  stop comes sooner (then single steps lead up to it, so that no call crosses it)."""
  limits = [k, spe - step % spe]
  if checkpoint_every:
    limits.append(checkpoint_every - step % checkpoint_every)
  if stop_after is not None:
    limits.append(max(stop_after - step, 1))
  return min(limits)


# --------------------------------------------------------------------------------------
# The run


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


def _check_finite(rows: list[dict], workdir: pathlib.Path, last_checkpoint) -> None:
  bad = next((r for r in rows if not np.isfinite(r["loss"])), None)
  if bad is not None:
    kept = (f"the last good checkpoint (step {last_checkpoint}) is kept in "
            f"{workdir / 'checkpoints' / 'latest'}" if last_checkpoint is not None
            else "no checkpoint had been written yet")
    raise FloatingPointError(
        f"The training loss is {bad['loss']} at step {bad['step']}: stopped without saving "
        f"this state; {kept}. Lower optimizer.learning_rate, or check the data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: int | None = None) -> dict | None:
  """Trains and evaluates ``config`` in ``workdir``; returns the summary, or None when the
  run stopped early (``stop_after_steps``, SIGTERM or SIGINT) after a checkpoint."""
  workdir = pathlib.Path(workdir).expanduser().resolve()
  is_writer = jax.process_index() == 0

  # ---- Everything that can reject the config comes before anything is written.
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.data_dir = str(pathlib.Path(config.data.data_dir).expanduser())
  builder = input_pipeline.load_builder(data_config)
  sources = input_pipeline.open_splits(builder)
  prep = input_pipeline.Preprocess.from_config(config.data)
  modalities = prep.modalities
  num_classes = builder.info.features["label"].num_classes
  spe = input_pipeline.steps_per_epoch(sources["train"], config.batch_size)
  total_steps = config.num_epochs * spe
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % jax.device_count():
      raise ValueError(f"config.{name}={config[name]} is not divisible by the "
                       f"{jax.device_count()} devices; use a multiple of {jax.device_count()}.")
  model = build_model(config, num_classes, len(modalities))
  tx = build_optimizer(config, spe)
  if config.schedule.name not in ("constant", "plateau"):
    raise ValueError(f"Unknown schedule.name {config.schedule.name!r}; expected constant or "
                     "plateau.")
  for path in config.model.get("pretrained", ()):
    if path and not pathlib.Path(path).is_file():
      raise FileNotFoundError(f"Pretrained weights file {path} (config.model.pretrained) "
                              "does not exist.")

  workdir.mkdir(parents=True, exist_ok=True)
  check_workdir_config(workdir, config, write=is_writer)

  # ---- State, steps, and the run so far.
  mesh = data_mesh()
  first = prep.resize(sources["train"][0])
  example = prep.batch({k: np.asarray(first[k])[None] for k in (*modalities, "label")})["inputs"]
  state = create_train_state(model, tx, example, config.seed)
  for branch, path in enumerate(config.model.get("pretrained", ())):
    if path:  # converted weights; a checkpoint, when there is one, replaces them below
      variables = models.load_branch_weights(state.variables, branch, path)
      state = state.replace(params=variables.pop("params"), model_state=variables)
  state = replicate(state, mesh)
  step_fn = make_train_step(model, tx)
  train_step = compile_train_step(step_fn, mesh)
  eval_step = compile_eval_step(make_eval_step(model), mesh)

  latest = _checkpoint_manager(workdir / "checkpoints" / "latest")
  best = _checkpoint_manager(workdir / "checkpoints" / "best")
  meta = {"step": 0, "best_val_accuracy": -1.0, "best_step": -1, "train_seconds": 0.0,
          "plateau": {"best": float("inf"), "bad_epochs": 0}, "full_accuracy_epochs": 0}
  if latest.latest_step() is not None:
    state, meta = _restore(latest, state)
    print(f"Resuming {workdir} from step {meta['step']}.")
  step = int(meta["step"])
  # Every process reads the logs (decisions at epoch ends use them); process 0 writes.
  step_log = MetricLog(_metrics_dir(workdir) / "steps.jsonl", step, write=is_writer)
  epoch_log = MetricLog(_metrics_dir(workdir) / "epochs.jsonl", step, write=is_writer)
  tb = _tensorboard(workdir) if is_writer else None

  def checkpoint(manager):
    if manager.latest_step() != step:
      meta.update(step=step)
      _save(manager, state, meta)

  def write_tables():
    step_log.write_csv()
    epoch_log.write_csv()

  # ---- Training.
  pending, pending_from, pending_steps = [], step, 0
  started = time.perf_counter()
  bar = tqdm(total=total_steps, initial=step, unit="step", desc=config.experiment,
             disable=not is_writer)
  k = config.steps_per_call
  multi_step = compile_multi_step(make_multi_step(step_fn, k), mesh) if k > 1 else None
  finished = False
  with StopSignal() as stop_signal:
    while step < total_steps and not finished:
      epoch, start = divmod(step, spe)
      batches = input_pipeline.train_batches(sources["train"], prep, config.batch_size,
                                             config.seed, epoch, start)
      at_epoch_end = False
      while not at_epoch_end:
        size = _call_size(step, k, spe, config.checkpoint_every_steps, stop_after_steps)
        if size == k > 1:
          chunk = stack_batches([next(batches) for _ in range(k)])
          state, metrics = multi_step(state, shard_stacked_batches(chunk, mesh))
        else:
          size = 1
          state, metrics = train_step(state, shard_batch(next(batches), mesh))
        pending.append((metrics, size if size > 1 else None))
        pending_steps += size
        step += size
        bar.update(size)
        at_epoch_end = step % spe == 0
        checkpoint_due = at_epoch_end or (
            config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
        stop_asked = stop_after_steps is not None and step >= stop_after_steps
        # Metrics reach the host here, and only here: every checkpoint follows a check
        # that the loss is finite, so a diverged state is never saved.
        if not (pending_steps >= config.log_every_steps or checkpoint_due or stop_asked):
          continue
        rows = _step_rows(pending, pending_from)
        pending, pending_from, pending_steps = [], step, 0
        bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", acc=f"{rows[-1]['accuracy']:.2f}",
                        d_speed=f"{rows[-1]['d_speed']:+.3f}")
        step_log.append(rows)
        if is_writer:
          _tb_write(tb, rows)
        _check_finite(rows, workdir, latest.latest_step())
        preempted = stop_signal.agreed()
        if at_epoch_end:
          meta["train_seconds"] += time.perf_counter() - started
          val = evaluate(eval_step, state, sources["validation"], prep,
                         config.eval_batch_size, mesh)
          this_epoch = [r for r in step_log.rows if step - spe < r["step"] <= step]
          row = _epoch_row(epoch + 1, step, this_epoch, val) | {
              "learning_rate": learning_rate(state.opt_state)}
          epoch_log.append([row])
          if is_writer:
            _tb_write(tb, [row], prefix="epoch/")
          if val["accuracy"] > meta["best_val_accuracy"]:
            meta.update(best_val_accuracy=val["accuracy"], best_step=step)
            checkpoint(best)
          state, finished = _end_of_epoch(config, state, row, meta, mesh)
          if finished:  # early stop: a full checkpoint, then the final evaluation
            checkpoint(latest)
            break
          started = time.perf_counter()
        if checkpoint_due or stop_asked or preempted:
          meta["train_seconds"] += time.perf_counter() - started
          started = time.perf_counter()
          checkpoint(latest)
        if stop_asked or preempted:
          bar.close()
          write_tables()
          why = "a stop signal" if preempted else f"--stop_after_steps={stop_after_steps}"
          print(f"Stopped by {why} at step {step}; checkpoint saved in {workdir}. "
                "Run the same command again to resume.")
          return None
  bar.close()

  # ---- Final evaluation with the best checkpoint (chosen on validation accuracy).
  state, _ = _restore(best, state)
  summary = final_summary(config, model, eval_step, state, sources, prep, mesh, meta,
                          builder, step_log.rows)
  write_tables()
  if is_writer:
    _atomic_write(workdir / "summary.json", json.dumps(summary, indent=2))
    plot_dir = workdir / "plots"
    plot_dir.mkdir(exist_ok=True)
    plots.speeds(step_log.rows, plot_dir / "speeds.png")
    plots.accuracy(epoch_log.rows, plot_dir / "accuracy.png")
    plots.utilization(summary, plot_dir / "utilization.png")
    tb.close()
  return summary


def _end_of_epoch(config, state: TrainState, row: dict, meta: dict, mesh):
  """The learning-rate schedule and the early stop, from the epoch's training metrics.
  Returns (state, whether training is finished)."""
  if config.schedule.name == "plateau":
    lr = learning_rate(state.opt_state)
    new_lr = plateau(config.schedule, meta["plateau"], row["train_loss"], lr)
    if new_lr != lr:
      print(f"\nEpoch {row['epoch']}: training loss on a plateau, learning rate {lr:g} -> "
            f"{new_lr:g}.")
      state = state.replace(opt_state=with_learning_rate(state.opt_state, new_lr, mesh))
  patience = config.early_stop_full_train_accuracy_epochs
  if patience and row["train_accuracy"] >= 1.0:
    meta["full_accuracy_epochs"] += 1
    if meta["full_accuracy_epochs"] >= patience:
      print(f"\nEarly stop after epoch {row['epoch']}: training accuracy 100% in "
            f"{patience} epochs.")
      return state, True
  return state, False


def _metrics_dir(workdir: pathlib.Path) -> pathlib.Path:
  path = workdir / "metrics"
  path.mkdir(exist_ok=True)
  return path


def _epoch_row(epoch: int, step: int, step_rows: list[dict], val: dict) -> dict:
  """Mean training metrics over the epoch's steps, validation metrics, last speeds."""
  row = {"epoch": epoch, "step": step}
  keys = [k for k in step_rows[0] if k == "loss" or k.endswith("accuracy")]
  row |= {f"train_{k}": float(np.mean([r[k] for r in step_rows])) for k in keys}
  row |= {f"val_{k}": v for k, v in val.items()}
  row |= {k: v for k, v in step_rows[-1].items() if k.startswith("s_") or k == "d_speed"}
  return row


def final_summary(config, model, eval_step, state, sources, prep, mesh, meta, builder,
                  step_rows) -> dict:
  """Accuracies on the test splits (``test``, and ``test_biased`` where the dataset has
  one), utilization rates, re-balancing shares and speed."""
  n = len(prep.modalities)
  summary = {
      "experiment": config.experiment,
      "method": config.balance.method,
      "update": config.balance.update_mode,
      "data_source": (builder.info.metadata or {}).get("mnist_source", "manual"),
      "best_step": int(meta["best_step"]),
      "best_val_accuracy": meta["best_val_accuracy"],
  }
  for split in [s for s in ("test", "test_biased") if s in sources]:
    result = evaluate(eval_step, state, sources[split], prep, config.eval_batch_size, mesh)
    summary[f"{split}_examples"] = result["examples"]
    summary[f"{split}_accuracy"] = result["accuracy"]
    for k in range(n):
      summary[f"{split}_branch_{k}_accuracy"] = result[f"branch_{k}_accuracy"]
  batches = lambda split: (shard_batch(b, mesh) for b in input_pipeline.eval_batches(
      sources[split], prep, config.eval_batch_size))
  util = conditional_utilization(model, state.variables, batches("train"), batches("test"))
  summary |= {k: v for k, v in util.as_dict().items() if k.startswith(("u(", "d_util"))}
  targets = np.asarray([r["target"] for r in step_rows])
  for k in range(n):
    summary[f"rebalance_share_m{k}"] = float(np.mean(targets == k)) if len(targets) else 0.0
  steps = int(meta["step"])
  summary["steps"] = steps
  summary["train_seconds"] = meta["train_seconds"]
  summary["samples_per_s"] = steps * config.batch_size / max(meta["train_seconds"], 1e-9)
  return summary


# --------------------------------------------------------------------------------------
# TensorBoard


def _tensorboard(workdir: pathlib.Path):
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

  return SummaryWriter(str(workdir / "tensorboard"))


def _tb_write(writer, rows: list[dict], prefix: str = "train/") -> None:
  for row in rows:
    for key, value in row.items():
      if key not in ("step", "epoch"):
        writer.add_scalar(prefix + key, value, row["step"])
  writer.flush()
