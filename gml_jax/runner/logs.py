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
from typing import Protocol, Sequence

import jax
import ml_collections

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


class MetricWriter(Protocol):
  """Where a run's metrics go (``clu.metric_writers``' idea): every writer gets the same
  rows; each decides how much of them to keep."""

  def write_steps(self, rows: list[dict]) -> None: ...

  def write_epoch(self, row: dict) -> None: ...

  def write_summary(self, summary: dict) -> None: ...

  def flush(self) -> None: ...

  def close(self) -> None: ...


class JsonlWriter:
  """``metrics/steps.jsonl`` and ``metrics/epochs.jsonl`` (every row; CSV copies at the
  end): the run's record, read back by the trainer, the plots and the study."""

  def __init__(self, workdir: storage.Path, resume_step: int, write: bool = True):
    self.steps = MetricLog(workdir / "metrics" / "steps.jsonl", resume_step, write)
    self.epochs = MetricLog(workdir / "metrics" / "epochs.jsonl", resume_step, write)

  def write_steps(self, rows: list[dict]) -> None:
    self.steps.append(rows)

  def write_epoch(self, row: dict) -> None:
    self.epochs.append([row])

  def write_summary(self, summary: dict) -> None:
    del summary  # summary.json is the trainer's

  def flush(self) -> None:
    self.steps.flush()
    self.epochs.flush()

  def close(self) -> None:
    self.steps.close()
    self.epochs.close()


def _scalars(row: dict, prefix: str) -> dict:
  return {prefix + k: v for k, v in row.items() if k not in (names.STEP, names.EPOCH)}


class TensorBoardWriter:
  """TensorBoard events in ``tensorboard/``: the last step row of each fetch (its writer
  costs the host ~1 ms a row) and every epoch row. On a bucket the events are written to a
  local folder (tensorboardX needs TensorFlow to write to ``gs://``) that :meth:`flush`
  copies to the bucket, file by file."""

  def __init__(self, workdir: storage.Path):
    from tensorboardX import SummaryWriter

    self._events = workdir / "tensorboard"
    self._staging = None
    if storage.is_remote(workdir):
      self._staging = pathlib.Path(tempfile.mkdtemp(prefix="tensorboard_",
                                                    dir=storage.local_cache_dir(mkdir=True)))
    self._writer = SummaryWriter(str(self._staging or self._events))

  def _add(self, row: dict, prefix: str) -> None:
    for key, value in _scalars(row, prefix).items():
      self._writer.add_scalar(key, value, row[names.STEP])
    self._writer.flush()

  def write_steps(self, rows: list[dict]) -> None:
    for row in rows[-1:]:
      self._add(row, "train/")

  def write_epoch(self, row: dict) -> None:
    self._add(row, "epoch/")

  def write_summary(self, summary: dict) -> None:
    del summary  # summary.json holds it

  def flush(self) -> None:
    if self._staging is not None:
      for events in self._staging.iterdir():
        (self._events / events.name).write_bytes(events.read_bytes())

  def close(self) -> None:
    self._writer.close()
    self.flush()
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)


class WandbWriter:
  """Weights & Biases (``logging.wandb``: project, entity, mode; the ``wandb`` extra): the
  scalars TensorBoard gets, the resolved config, and the summary's numbers. Mode
  "offline" keeps the run in ``<workdir>/wandb/`` (``wandb sync`` uploads it later). A
  resumed run continues the same W&B run (its id comes from the workdir)."""

  def __init__(self, workdir: storage.Path, options, config: dict):
    import hashlib
    import os

    os.environ.setdefault("WANDB_SILENT", "true")  # its console lines would bury the bar
    import wandb

    local = workdir if not storage.is_remote(workdir) else storage.local_cache_dir(mkdir=True)
    self._run = wandb.init(
        project=options.project, entity=options.entity or None, mode=options.mode,
        dir=str(local), config=config, resume="allow",
        id=hashlib.sha256(str(workdir).encode()).hexdigest()[:16],
        name=f"{config.get('experiment', '')}/{config.get('balance', {}).get('method', '')}")

  def write_steps(self, rows: list[dict]) -> None:
    for row in rows[-1:]:
      self._run.log(_scalars(row, "train/"), step=row[names.STEP])

  def write_epoch(self, row: dict) -> None:
    self._run.log(_scalars(row, "epoch/"), step=row[names.STEP])

  def write_summary(self, summary: dict) -> None:
    for key, value in summary.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self._run.summary[key] = value

  def flush(self) -> None:
    pass  # W&B writes in its own process

  def close(self) -> None:
    self._run.finish()


class RunLogs:
  """A run's metric writers (:class:`MetricWriter`): the JSON lines (with CSV copies),
  TensorBoard events in ``tensorboard/``, and W&B where ``logging.wandb.project`` names a
  project. Only process 0 (``write``) writes; :attr:`steps` and :attr:`epochs` read the
  JSON lines back on every process."""

  def __init__(self, workdir: storage.Path, resume_step: int, write: bool,
               config: dict | None = None):
    jsonl = JsonlWriter(workdir, resume_step, write)
    self.steps, self.epochs = jsonl.steps, jsonl.epochs
    self.writers: list[MetricWriter] = [jsonl]
    if write:
      self.writers.append(TensorBoardWriter(workdir))
      wandb = (config or {}).get("logging", {}).get("wandb", {})
      if wandb.get("project"):
        self.writers.append(WandbWriter(workdir, ml_collections.ConfigDict(wandb), config))

  def add_steps(self, rows: list[dict]) -> None:
    for writer in self.writers:
      writer.write_steps(rows)

  def add_epoch(self, row: dict) -> None:
    for writer in self.writers:
      writer.write_epoch(row)

  def add_summary(self, summary: dict) -> None:
    for writer in self.writers:
      writer.write_summary(summary)

  def flush(self) -> None:
    """What waits for a bucket goes there (before every checkpoint, and at the end)."""
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in reversed(self.writers):  # the JSON lines last: they are the record
      writer.close()


def step_rows(pending: list[tuple[dict, int]], last_step: int, modalities: Sequence[int],
              templates: dict[str, str]) -> list[dict]:
  """Metrics of the calls since the last fetch -> one JSON row per step (one host sync).

  ``pending`` holds (metrics, steps) per call; the metrics of a multi-step call have a
  leading step axis. A row's step is the number of steps done after it (1, 2, ...), as in
  checkpoints; the last is ``last_step``. ``templates`` names the row key of every metric
  (:data:`names.STEP_METRICS` and the transforms' declared METRICS): scalars first, then
  per modality every per-branch value, branch b's keyed by the dataset modality it reads,
  ``modalities[b]``. A metric without a template is a ValueError: nothing is dropped.
  """
  per_step = []
  for metrics, steps in jax.device_get(pending):
    per_step += [metrics] if steps == 1 else [
        jax.tree.map(lambda x, i=i: x[i], metrics) for i in range(steps)]
  unnamed = sorted(set(per_step[0]) - set(templates)) if per_step else []
  if unnamed:
    raise ValueError(f"The train step returned metrics {unnamed} that no state declares: add "
                     "them to the METRICS of the transform state that reports them.")
  scalars = [(k, t) for k, t in templates.items() if not names.per_modality(t)]
  arrays = [(k, t) for k, t in templates.items() if names.per_modality(t)]
  first_step = last_step - len(per_step)
  rows = []
  for i, m in enumerate(per_step):
    row = {names.STEP: first_step + i + 1}
    row |= {t: (int if t in names.INTEGER_METRICS else float)(m[k])
            for k, t in scalars if k in m}
    for branch, modality in enumerate(modalities):
      row |= {names.row_key(t, modality): float(m[k][branch]) for k, t in arrays if k in m}
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
