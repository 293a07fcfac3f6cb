"""A run's metric logs: ``metrics/steps.jsonl`` and ``metrics/epochs.jsonl`` (with CSV
copies) and TensorBoard events; the rows they hold."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib
import shutil
import tempfile
from typing import Sequence

import jax

from gml_jax.runner import names, storage
from gml_jax.runner.workdir import atomic_write, open_no_follow, refuse_link


class MetricLog:
  """Append-only JSON lines, cut back to the restored step on resume, with a CSV copy.
  Rows are not kept in memory: :meth:`rows` reads them back. Only the process with
  ``write`` touches the file.

  On a bucket, where objects cannot be appended to, rows wait in memory until
  :meth:`flush` (at every checkpoint and at the end) writes them as one part,
  ``<name>.parts/<last step>.jsonl``: one upload per checkpoint. Since every checkpoint
  is preceded by a flush, the parts split at checkpoints, and resuming from step s deletes
  the parts past s, as a local log is cut at s; a preemption loses the rows after the last
  checkpoint, which a resume drops on a local disk too. :meth:`close` writes the
  whole log (and its CSV copy) under the usual name for its readers.
  """

  def __init__(self, path: storage.Path, resume_step: int, write: bool = True):
    self.path, self.write = path, write
    self.remote = storage.is_remote(path)
    self.parts = path.with_name(path.stem + ".parts")
    self._pending: list[dict] = []
    if not write:
      return
    refuse_link(path)
    if self.remote:  # parts past the restored checkpoint belong to the lost future
      for part in self._part_paths():
        if int(part.stem) > resume_step:
          part.unlink()
      return
    # Rows past the restored checkpoint belong to the lost future.
    rows = [r for r in self.rows() if r[names.STEP] <= resume_step]
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))

  def _part_paths(self) -> list:
    return sorted(self.parts.glob("*.jsonl"), key=lambda p: int(p.stem)) if (
        self.parts.exists()) else []

  def rows(self) -> list[dict]:
    """Every row of the log (a last line cut short by a hard kill left out)."""
    if self.remote:
      return [json.loads(line) for part in self._part_paths()
              for line in part.read_text().splitlines()] + self._pending
    if not self.path.exists():
      return []
    lines = self.path.read_text().splitlines()
    return [json.loads(line) for line in lines[:-1]] + _parse_last(lines[-1:])

  def append(self, rows: list[dict]) -> None:
    if not self.write:
      return
    if self.remote:
      self._pending += rows
      return
    with open_no_follow(self.path, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)

  def flush(self) -> None:
    """On a bucket, the rows since the last flush as one part (nothing to do on a disk)."""
    if self._pending:
      last = self._pending[-1][names.STEP]
      atomic_write(self.parts / f"{last:09d}.jsonl",
                   "".join(json.dumps(r) + "\n" for r in self._pending))
      self._pending = []

  def close(self) -> None:
    """Flushes; on a bucket, writes the whole log under its name; then the CSV copy."""
    self.flush()
    rows = self.rows() if self.write else []
    if not rows:
      return
    if self.remote:
      atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in rows))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(self.path.with_suffix(".csv"), text.getvalue())


def _parse_last(lines: list[str]) -> list[dict]:
  """The last row, unless a hard kill cut it short mid-write."""
  try:
    return [json.loads(line) for line in lines]
  except json.JSONDecodeError:
    return []


class RunLogs:
  """``metrics/steps.jsonl``, ``metrics/epochs.jsonl`` (with CSV copies) and TensorBoard
  events in ``tensorboard/``; only process 0 (``write``) writes. On a bucket, TensorBoard
  writes to a local folder (tensorboardX needs TensorFlow to write to ``gs://``) that
  :meth:`flush` copies to the bucket, file by file."""

  def __init__(self, workdir: storage.Path, resume_step: int, write: bool):
    self.steps = MetricLog(workdir / "metrics" / "steps.jsonl", resume_step, write)
    self.epochs = MetricLog(workdir / "metrics" / "epochs.jsonl", resume_step, write)
    self._tensorboard = None
    self._events = workdir / "tensorboard"
    self._staging = None
    if write:
      from tensorboardX import SummaryWriter

      if storage.is_remote(workdir):
        self._staging = pathlib.Path(tempfile.mkdtemp(prefix="tensorboard_",
                                                      dir=storage.local_cache_dir(mkdir=True)))
      self._tensorboard = SummaryWriter(str(self._staging or self._events))

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

  def flush(self) -> None:
    """What waits for a bucket goes there (before every checkpoint, and at the end)."""
    self.steps.flush()
    self.epochs.flush()
    if self._staging is not None:
      for events in self._staging.iterdir():
        (self._events / events.name).write_bytes(events.read_bytes())

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
    self.flush()
    self.steps.close()
    self.epochs.close()
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)


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
