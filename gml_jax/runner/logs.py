"""A run's metric logs: ``metrics/steps.jsonl`` and ``metrics/epochs.jsonl`` (with CSV
copies) and TensorBoard events; the rows they hold."""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from typing import Sequence

import jax

from gml_jax.runner import names
from gml_jax.runner.workdir import atomic_write, open_no_follow, refuse_link


class MetricLog:
  """Append-only JSON lines, cut back to the restored step on resume, with a CSV copy.
  Rows are not kept in memory: :meth:`rows` reads them back. Only the process with
  ``write`` touches the file."""

  def __init__(self, path: pathlib.Path, resume_step: int, write: bool = True):
    self.path, self.write = path, write
    if write:
      refuse_link(path)
      # Rows past the restored checkpoint belong to the lost future.
      rows = [r for r in self.rows() if r[names.STEP] <= resume_step]
      path.parent.mkdir(exist_ok=True)
      atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))

  def rows(self) -> list[dict]:
    """Every row of the file (a last line cut short by a hard kill left out)."""
    if not self.path.exists():
      return []
    lines = self.path.read_text().splitlines()
    return [json.loads(line) for line in lines[:-1]] + _parse_last(lines[-1:])

  def append(self, rows: list[dict]) -> None:
    if self.write:
      with open_no_follow(self.path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

  def write_csv(self) -> None:
    rows = self.rows() if self.write else []
    if not rows:
      return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open_no_follow(self.path.with_suffix(".csv"), "w") as f:
      writer = csv.DictWriter(f, keys)
      writer.writeheader()
      writer.writerows(rows)


def _parse_last(lines: list[str]) -> list[dict]:
  """The last row, unless a hard kill cut it short mid-write."""
  try:
    return [json.loads(line) for line in lines]
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
      from tensorboardX import SummaryWriter

      self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

  def add_steps(self, rows: list[dict]) -> None:
    """Every row to the JSON lines; the last (one per fetch, about every
    ``log_every_steps``) to TensorBoard, whose writer costs the host ~1 ms a row."""
    self.steps.append(rows)
    self._to_tensorboard(rows[-1:], "train/")

  def add_epoch(self, row: dict) -> None:
    self.epochs.append([row])
    self._to_tensorboard([row], "epoch/")

  def _to_tensorboard(self, rows: list[dict], prefix: str) -> None:
    if self._tensorboard is None:
      return
    for row in rows:
      for key, value in row.items():
        if key not in (names.STEP, names.EPOCH):
          self._tensorboard.add_scalar(prefix + key, value, row[names.STEP])
    self._tensorboard.flush()

  def close(self) -> None:
    self.steps.write_csv()
    self.epochs.write_csv()
    if self._tensorboard is not None:
      self._tensorboard.close()


def step_rows(pending: list[tuple[dict, int]], last_step: int,
              modalities: Sequence[int]) -> list[dict]:
  """Metrics of the calls since the last fetch -> one JSON row per step (one host sync).

  ``pending`` holds (metrics, steps) per call; the metrics of a multi-step call have a
  leading step axis. A row's step is the number of steps done after it (1, 2, ...), as in
  checkpoints; the last is ``last_step``. Branch b's values are keyed by the dataset
  modality it reads, ``modalities[b]`` (:mod:`~gml_jax.runner.names`); speeds where the run
  measures them, OGM-GE's ratios and coefficients where it modulates.
  """
  per_step = []
  for metrics, steps in jax.device_get(pending):
    per_step += [metrics] if steps == 1 else [
        jax.tree.map(lambda x, i=i: x[i], metrics) for i in range(steps)]
  first_step = last_step - len(per_step)
  rows = []
  for i, m in enumerate(per_step):
    row = {names.STEP: first_step + i + 1}
    row |= {key: (int if key == names.TARGET else float)(m[metric])
            for metric, key in names.SCALARS.items() if metric in m}
    for branch, modality in enumerate(modalities):
      row |= {key(modality): float(m[metric][branch])
              for metric, key in names.PER_BRANCH.items() if metric in m}
    rows.append(row)
  return rows


@dataclasses.dataclass
class EpochSums:
  """Running sums of the current epoch's step rows: loss and accuracies, and the last
  row's speeds. Saved with every checkpoint (a resumed epoch's means count the steps
  before the stop), reset at every epoch end.
  """

  sums: dict = dataclasses.field(default_factory=dict)
  count: int = 0
  last_speeds: dict = dataclasses.field(default_factory=dict)

  def add(self, rows: list[dict], modalities: Sequence[int]) -> None:
    for row in rows:
      for key in names.averaged(modalities):
        self.sums[key] = self.sums.get(key, 0.0) + row[key]
      self.last_speeds = {k: row[k] for k in names.last_speeds(modalities) if k in row}
    self.count += len(rows)


def epoch_row(epoch: int, step: int, sums: EpochSums, val: dict) -> dict:
  """Mean training metrics over the epoch's steps, validation metrics, last speeds."""
  row = {names.EPOCH: epoch, names.STEP: step}
  row |= {names.train(k): total / sums.count for k, total in sums.sums.items()}
  row |= {names.val(k): v for k, v in val.items()}
  return row | sums.last_speeds
