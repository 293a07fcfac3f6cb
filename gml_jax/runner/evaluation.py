"""Evaluation over whole splits, the final summary of a run, and its printed table."""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import jax
import numpy as np

from gml_jax.utilization import conditional_utilization


def evaluate(eval_step, state, batches: Iterable[dict], modalities: Sequence[int]) -> dict:
  """Accuracy and loss of ŷ and of each branch over device-placed ``batches`` of a whole
  split (normal fusion); branch b is named by the modality it reads, ``modalities[b]``."""
  totals = None
  for batch in batches:
    sums = eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  out = {"examples": int(count), "accuracy": float(totals["correct"]) / count,
         "loss": float(totals["loss_sum"]) / count}
  for modality, c in zip(modalities, totals["branch_correct"]):
    out[f"branch_{modality}_accuracy"] = float(c) / count
  return out


def final_summary(config, model, eval_step, state, split_batches, data_source: str, progress,
                  step_rows: list[dict]) -> dict:
  """Accuracies on the test splits (``test``, and ``test_biased`` where the dataset has
  one), utilization rates (models with fusion layers), re-balancing shares and speed; per
  modality values are named by the dataset modality (``config.data.modalities``).

  ``split_batches(split)`` gives a fresh iterator of the split's device-placed batches.
  The test pass of the accuracies is also the baseline A(f_k) of the utilization rates.
  """
  modalities = tuple(config.data.modalities)
  summary = {
      "experiment": config.experiment,
      "method": config.balance.method,
      "update": config.balance.update_mode,
      "fusion": config.model.fusion,
      "modalities": list(modalities),
      "data_source": data_source,
      "best_step": progress.best_step,
      "best_val_accuracy": progress.best_val_accuracy,
  }
  test_batches = None
  for split in ("test", "test_biased"):
    batches = split_batches(split)
    if batches is None:
      continue
    if split == "test":  # kept for the utilization passes
      batches = test_batches = list(batches)
    result = evaluate(eval_step, state, batches, modalities)
    summary[f"{split}_examples"] = result["examples"]
    summary[f"{split}_accuracy"] = result["accuracy"]
    for m in modalities:
      summary[f"{split}_branch_{m}_accuracy"] = result[f"branch_{m}_accuracy"]
  # Without fusion layers no branch sees another modality: every u is 0 by construction.
  if config.model.fusion == "mmtm":
    baseline = (summary["test_accuracy"],
                [summary[f"test_branch_{m}_accuracy"] for m in modalities])
    rates = conditional_utilization(model, state.variables, split_batches("train"),
                                    test_batches, baseline=baseline).as_dict()
    for j, k in itertools.permutations(range(len(modalities)), 2):
      summary[f"u(m{modalities[j]}|m{modalities[k]})"] = rates[f"u(m{j}|m{k})"]
    if "d_util" in rates:
      summary["d_util"] = rates["d_util"]
  targets = np.asarray([r["target"] for r in step_rows])
  for k, m in enumerate(modalities):
    summary[f"rebalance_share_m{m}"] = float(np.mean(targets == k)) if len(targets) else 0.0
  summary["steps"] = progress.step
  summary["train_seconds"] = progress.train_seconds
  summary["samples_per_s"] = progress.step * config.batch_size / max(progress.train_seconds,
                                                                     1e-9)
  return summary


def format_summary(summary: dict) -> str:
  """The final table: accuracies, utilization rates, re-balancing share, speed."""
  model = "" if summary.get("fusion", "mmtm") == "mmtm" else (
      f"no fusion, modalities {summary['modalities']}, ")
  lines = [f"{summary['experiment']} / {summary['method']} ({model}update={summary['update']}, "
           f"data: {summary['data_source']}), best validation accuracy "
           f"{summary['best_val_accuracy']:.4f} at step {summary['best_step']}", ""]
  modalities = [k[len("test_branch_"):-len("_accuracy")] for k in summary
                if k.startswith("test_branch_")]
  lines.append(f"{'':24}{'fused':>8}" + "".join(f"{f'branch {m}':>10}" for m in modalities))
  for split, prefix in (("test", "test_"), ("test_biased", "test_biased_")):
    if prefix + "accuracy" not in summary:
      continue
    lines.append(f"{split + ' accuracy':24}{summary[prefix + 'accuracy']:>8.4f}" + "".join(
        f"{summary[f'{prefix}branch_{m}_accuracy']:>10.4f}" for m in modalities))
  lines.append("")
  for key in [k for k in summary if k.startswith("u(")] + ["d_util"]:
    if key in summary:
      value = summary[key]
      lines.append(f"{key:24}" + (f"{value:>+8.4f}" if value is not None else
                                  "   undefined (a branch has test accuracy 0)"))
  if summary.get("fusion") == "none":
    lines.append(f"{'utilization':24}0 by construction (no fusion layers)")
  shares = ", ".join(f"m{m} {summary[f'rebalance_share_m{m}']:.1%}" for m in modalities)
  lines.append(f"{'re-balancing steps':24}{shares}")
  lines.append(f"{'training':24}{summary['steps']} steps, {summary['train_seconds']:.1f} s, "
               f"{summary['samples_per_s']:.0f} samples/s")
  return "\n".join(lines)
