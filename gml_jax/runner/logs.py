"""A run's metric logs: ``metrics/steps.jsonl`` and ``metrics/epochs.jsonl`` (with CSV
copies) and TensorBoard events; the rows they hold."""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Sequence

import jax
import numpy as np

from gml_jax.runner.workdir import atomic_write, open_no_follow, refuse_link



class MetricLog:
  """Append-only JSON lines, cut back to the restored step on resume, with a CSV copy.
  Every process keeps the rows; only the one with ``write`` touches the files."""

  def __init__(self, path: pathlib.Path, resume_step: int, write: bool = True):
    self.path, self.write = path, write
    rows = []
    refuse_link(path)
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
      with open_no_follow(self.path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

  def write_csv(self) -> None:
    if not self.rows or not self.write:
      return
    keys = list(dict.fromkeys(k for r in self.rows for k in r))
    with open_no_follow(self.path.with_suffix(".csv"), "w") as f:
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
        if key not in ("step", "epoch"):
          self._tensorboard.add_scalar(prefix + key, value, row["step"])
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
  checkpoints; the last is ``last_step``. Per-branch values are named by the dataset
  modality the branch reads (``modalities[b]`` for branch b); speeds where the run
  measures them, OGM-GE's ratios and coefficients where it modulates.
  """
  per_step = []
  for metrics, steps in jax.device_get(pending):
    per_step += [metrics] if steps == 1 else [
        jax.tree.map(lambda x, i=i: x[i], metrics) for i in range(steps)]
  first_step = last_step - len(per_step)
  per_branch = {"branch_accuracy": "branch_{}_accuracy", "branch_loss": "branch_{}_loss",
                "speeds": "s_{}", "mu_main": "mu_main_{}", "mu_fusion": "mu_fusion_{}",
                "ogm_ratio": "ogm_ratio_{}", "ogm_coefficient": "ogm_coefficient_{}"}
  rows = []
  for i, m in enumerate(per_step):
    row = {"step": first_step + i + 1, "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
           "target": int(m["target"])}
    if "d_speed" in m:
      row["d_speed"] = float(m["d_speed"])
    for b, modality in enumerate(modalities):
      row |= {name.format(modality): float(m[key][b]) for key, name in per_branch.items()
              if key in m}
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
