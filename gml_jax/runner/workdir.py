"""A run's workdir: the config guard, the metric logs, TensorBoard, the checkpoints and the
run's progress saved with them."""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib

import ml_collections
import orbax.checkpoint as ocp

from gml_jax.runner.schedule import PlateauTracker
from gml_jax.steps import TrainState


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
    atomic_write(path, json.dumps(current, indent=2, sort_keys=True))


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def atomic_write(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


# --------------------------------------------------------------------------------------
# Metric logs


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
      path.parent.mkdir(exist_ok=True)
      atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
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


class RunLogs:
  """``metrics/steps.jsonl``, ``metrics/epochs.jsonl`` (with CSV copies) and TensorBoard
  events in ``tensorboard/``; only process 0 (``write``) writes."""

  def __init__(self, workdir: pathlib.Path, resume_step: int, write: bool):
    self.steps = MetricLog(workdir / "metrics" / "steps.jsonl", resume_step, write)
    self.epochs = MetricLog(workdir / "metrics" / "epochs.jsonl", resume_step, write)
    self._tensorboard = None
    if write:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

  def add_steps(self, rows: list[dict]) -> None:
    self.steps.append(rows)
    self._to_tensorboard(rows, "train/")

  def add_epoch(self, row: dict) -> None:
    self.epochs.append([row])
    self._to_tensorboard([row], "epoch/")

  def _to_tensorboard(self, rows: list[dict], prefix: str) -> None:
    if self._tensorboard is None:
      return
    for row in rows:
      for key, value in row.items():
        if key not in ("step", "epoch"):
          self._tensorboard.add_scalar(prefix + key, value, row["step"])
    self._tensorboard.flush()

  def close(self) -> None:
    self.steps.write_csv()
    self.epochs.write_csv()
    if self._tensorboard is not None:
      self._tensorboard.close()


# --------------------------------------------------------------------------------------
# Checkpoints and the run's progress


@dataclasses.dataclass
class Progress:
  """Where a run stands; saved (as JSON) with every checkpoint.

  Attributes:
    step: training steps done: the one step counter of the run.
    best_val_accuracy: the best validation accuracy of ŷ at an epoch end so far.
    best_step: the step of that epoch end (-1: none yet).
    train_seconds: time spent in training steps (evaluations excluded).
    plateau: the reduce-on-plateau schedule's tracker.
    full_accuracy_epochs: epochs at 100% training accuracy (for the early stop).
  """

  step: int = 0
  best_val_accuracy: float = -1.0
  best_step: int = -1
  train_seconds: float = 0.0
  plateau: PlateauTracker = dataclasses.field(default_factory=PlateauTracker)
  full_accuracy_epochs: int = 0

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, meta: dict) -> "Progress":
    return cls(**(meta | {"plateau": PlateauTracker(**meta["plateau"])}))


class Checkpoints:
  """``checkpoints/latest`` and ``checkpoints/best`` of a workdir: orbax checkpoints of the
  whole train state with the run's :class:`Progress`."""

  def __init__(self, workdir: pathlib.Path):
    # Orbax writes into a temporary directory and renames it when complete: a run killed
    # mid-save leaves the previous checkpoint intact.
    manager = lambda name: ocp.CheckpointManager(
        workdir / "checkpoints" / name, options=ocp.CheckpointManagerOptions(max_to_keep=1))
    self.latest, self.best = manager("latest"), manager("best")

  def save(self, manager: ocp.CheckpointManager, state: TrainState,
           progress: Progress) -> None:
    if manager.latest_step() == progress.step:
      return
    manager.save(progress.step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(progress.to_json())),
                 force=True)
    manager.wait_until_finished()

  def restore(self, manager: ocp.CheckpointManager,
              target: TrainState) -> tuple[TrainState, Progress]:
    step = manager.latest_step()
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
      return restored.state, Progress.from_json(restored.meta)
    except Exception as e:  # orbax reports structure/shape mismatches in many ways
      raise ValueError(
          f"Checkpoint {manager.directory}/{step} does not fit this model and optimizer "
          f"(saved by another config or code version?): {e}") from e
