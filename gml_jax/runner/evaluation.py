"""Evaluation over whole splits, the final summary of a run, and its printed table."""

from __future__ import annotations

from typing import Iterable

import jax
import numpy as np

from gml_jax.utilization import conditional_utilization


def evaluate(eval_step, state, batches: Iterable[dict]) -> dict:
  """Accuracy and loss of ŷ and of each branch over device-placed ``batches`` of a whole
  split (normal fusion)."""
  totals = None
  for batch in batches:
    sums = eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  out = {"examples": int(count), "accuracy": float(totals["correct"]) / count,
         "loss": float(totals["loss_sum"]) / count}
  for k, c in enumerate(totals["branch_correct"]):
    out[f"branch_{k}_accuracy"] = float(c) / count
  return out


def final_summary(config, model, eval_step, state, split_batches, num_modalities: int,
                  data_source: str, progress, step_rows: list[dict]) -> dict:
  """Accuracies on the test splits (``test``, and ``test_biased`` where the dataset has
  one), utilization rates, re-balancing shares and speed.

  ``split_batches(split)`` gives a fresh iterator of the split's device-placed batches.
  The test pass of the accuracies is also the baseline A(f_k) of the utilization rates.
  """
  summary = {
      "experiment": config.experiment,
      "method": config.balance.method,
      "update": config.balance.update_mode,
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
    result = evaluate(eval_step, state, batches)
    summary[f"{split}_examples"] = result["examples"]
    summary[f"{split}_accuracy"] = result["accuracy"]
    for k in range(num_modalities):
      summary[f"{split}_branch_{k}_accuracy"] = result[f"branch_{k}_accuracy"]
  baseline = (summary["test_accuracy"],
              [summary[f"test_branch_{k}_accuracy"] for k in range(num_modalities)])
  util = conditional_utilization(model, state.variables, split_batches("train"), test_batches,
                                 baseline=baseline)
  summary |= {k: v for k, v in util.as_dict().items() if k.startswith(("u(", "d_util"))}
  targets = np.asarray([r["target"] for r in step_rows])
  for k in range(num_modalities):
    summary[f"rebalance_share_m{k}"] = float(np.mean(targets == k)) if len(targets) else 0.0
  summary["steps"] = progress.step
  summary["train_seconds"] = progress.train_seconds
  summary["samples_per_s"] = progress.step * config.batch_size / max(progress.train_seconds,
                                                                     1e-9)
  return summary


def format_summary(summary: dict) -> str:
  """The final table: accuracies, utilization rates, re-balancing share, speed."""
  lines = [f"{summary['experiment']} / {summary['method']} (update={summary['update']}, "
           f"data: {summary['data_source']}), best validation accuracy "
           f"{summary['best_val_accuracy']:.4f} at step {summary['best_step']}", ""]
  n = len([k for k in summary if k.startswith("test_branch_")])
  lines.append(f"{'':24}{'fused':>8}" + "".join(f"{f'branch {k}':>10}" for k in range(n)))
  for split, prefix in (("test", "test_"), ("test_biased", "test_biased_")):
    if prefix + "accuracy" not in summary:
      continue
    lines.append(f"{split + ' accuracy':24}{summary[prefix + 'accuracy']:>8.4f}" + "".join(
        f"{summary[f'{prefix}branch_{k}_accuracy']:>10.4f}" for k in range(n)))
  lines.append("")
  for key in [k for k in summary if k.startswith("u(")] + ["d_util"]:
    if key in summary:
      value = summary[key]
      lines.append(f"{key:24}" + (f"{value:>+8.4f}" if value is not None else
                                  "   undefined (a branch has test accuracy 0)"))
  shares = ", ".join(f"m{k} {summary[f'rebalance_share_m{k}']:.1%}" for k in range(n))
  lines.append(f"{'re-balancing steps':24}{shares}")
  lines.append(f"{'training':24}{summary['steps']} steps, {summary['train_seconds']:.1f} s, "
               f"{summary['samples_per_s']:.0f} samples/s")
  return "\n".join(lines)
