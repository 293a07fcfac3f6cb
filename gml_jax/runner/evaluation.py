"""Evaluation over whole splits, the final summary of a run, and its printed table."""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

import jax
import numpy as np

from gml_jax.runner import names
from gml_jax.utilization import conditional_utilization


def evaluate(eval_step, state, batches: Iterable[dict], modalities: Sequence[int]) -> dict:
  """Accuracy and loss of ŷ and of each branch over device-placed ``batches`` of a whole
  split (normal fusion), keyed as :func:`~gml_jax.runner.names.evaluated`; branch b is
  keyed by the modality it reads, ``modalities[b]``."""
  totals = None
  for batch in batches:
    sums = eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  out = {names.EXAMPLES: int(count), names.ACCURACY: float(totals["correct"]) / count,
         names.LOSS: float(totals["loss_sum"]) / count}
  for modality, correct in zip(modalities, totals["branch_correct"]):
    out[names.branch_accuracy(modality)] = float(correct) / count
  return out


def final_summary(config, model, eval_step, state, split_batches, data_source: str, progress,
                  rebalance_steps: Sequence[int]) -> dict:
  """Accuracies on the test splits (``test``, and ``test_biased`` where the dataset has
  one), utilization rates (models with fusion layers), re-balancing shares (from the
  re-balancing steps of each branch over the whole run) and speed; per modality values are
  keyed by the dataset modality (``config.data.modalities``).

  ``split_batches(split)`` gives a fresh iterator of the split's device-placed batches.
  The test pass of the accuracies is also the baseline A(f_k) of the utilization rates.
  """
  modalities = tuple(config.data.modalities)
  summary = {
      "experiment": config.experiment,
      "method": config.balance.method,
      # A re-balancing step's update mode: the method's where it has one, else that of the
      # balancing transform that measures the speeds ("branch", its default).
      "update": config.balance.get(config.balance.method, {}).get("update_mode", "branch"),
      names.FUSION: config.model.fusion,
      names.MODALITIES: list(modalities),
      "data_source": data_source,
      names.BEST_STEP: progress.best_step,
      names.BEST_VAL_ACCURACY: progress.best_val_accuracy,
  }
  test_batches, test = None, None
  for split in names.TEST_SPLITS:
    batches = split_batches(split)
    if batches is None:
      continue
    if split == "test":  # kept for the utilization passes
      batches = test_batches = list(batches)
    result = evaluate(eval_step, state, batches, modalities)
    test = result if split == "test" else test
    summary |= {names.split(split, key): result[key] for key in names.evaluated(modalities)
                if key != names.LOSS}
  # Without fusion layers no branch sees another modality: every u is 0 by construction.
  if config.model.fusion == "mmtm":
    summary |= utilization_rates(model, state, split_batches("train"), test_batches, test,
                                 modalities)
  for modality, steps in zip(modalities, rebalance_steps):
    summary[names.rebalance_share(modality)] = steps / progress.step if progress.step else 0.0
  summary[names.STEPS] = progress.step
  summary[names.TRAIN_SECONDS] = progress.train_seconds
  summary[names.SAMPLES_PER_S] = progress.step * config.batch_size / max(
      progress.train_seconds, 1e-9)
  return summary


def utilization_rates(model, state, train_batches, batches: list, evaluated: dict,
                      modalities: Sequence[int]) -> dict:
  """u(m_j|m_k) of every pair (and d_util for two modalities) on a split: ``batches`` (a
  list: it is read once per modality) and its :func:`evaluate` result ``evaluated``, whose
  branch accuracies are the A(f_k); the means that replace a dropped modality come from
  ``train_batches``. Keyed as :func:`~gml_jax.runner.names.utilization`."""
  baseline = (evaluated[names.ACCURACY], [evaluated[names.branch_accuracy(m)] for m in modalities])
  rates = conditional_utilization(model, state.variables, train_batches, batches,
                                  baseline=baseline)
  out = {names.utilization(modalities[j], modalities[k]): _defined(rates.rates[j, k])
         for j, k in itertools.permutations(range(len(modalities)), 2)}
  if len(modalities) == 2:
    out[names.D_UTIL] = _defined(rates.d_util)
  return out


def speed_util_correlation(epoch_rows: Sequence[dict]) -> float | None:
  """Spearman's rank correlation, over a run's epochs, of d_speed at the epoch's end and the
  validation d_util measured there: how well the speed (the proxy) orders the epochs as the
  rate does. None with fewer than 3 epochs that have both, or when either is constant."""
  pairs = [(r[names.D_SPEED], r[names.val(names.D_UTIL)]) for r in epoch_rows
           if r.get(names.D_SPEED) is not None and r.get(names.val(names.D_UTIL)) is not None
           and math.isfinite(r[names.D_SPEED])]
  if len(pairs) < 3 or any(np.ptp(column) == 0 for column in zip(*pairs)):
    return None
  speed, util = (_ranks(column) for column in zip(*pairs))
  return float(np.corrcoef(speed, util)[0, 1])


def _ranks(values) -> np.ndarray:
  """Ranks from 0, ties sharing their mean rank (Spearman's convention). By hand: importing
  scipy.stats would add most of a second to every run's start."""
  values = np.asarray(values)
  ranks = np.empty(len(values))
  ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
  _, group, count = np.unique(values, return_inverse=True, return_counts=True)
  return (np.bincount(group, weights=ranks) / count)[group]


def _defined(rate) -> float | None:
  """A rate, or None where it is undefined (its branch has accuracy 0)."""
  return float(rate) if math.isfinite(rate) else None


def format_summary(summary: dict) -> str:
  """The final table: accuracies, utilization rates, re-balancing share, speed."""
  modalities = summary[names.MODALITIES]
  model = "" if summary.get(names.FUSION, "mmtm") == "mmtm" else (
      f"no fusion, modalities {modalities}, ")
  lines = [f"{summary['experiment']} / {summary['method']} ({model}update={summary['update']}, "
           f"data: {summary['data_source']}), best validation accuracy "
           f"{summary[names.BEST_VAL_ACCURACY]:.4f} at step {summary[names.BEST_STEP]}", ""]
  lines.append(f"{'':24}{'fused':>8}" + "".join(f"{f'branch {m}':>10}" for m in modalities))
  for split in names.TEST_SPLITS:
    if names.split(split, names.ACCURACY) not in summary:
      continue
    lines.append(f"{split + ' accuracy':24}{summary[names.split(split, names.ACCURACY)]:>8.4f}"
                 + "".join(f"{summary[names.split(split, names.branch_accuracy(m))]:>10.4f}"
                           for m in modalities))
  lines.append("")
  rates = [names.utilization(j, k) for j, k in names.utilization_pairs(modalities)]
  for key in [*rates, names.D_UTIL]:
    if key in summary:
      value = summary[key]
      lines.append(f"{key:24}" + (f"{value:>+8.4f}" if value is not None else
                                  "   undefined (a branch has test accuracy 0)"))
  if summary.get(names.FUSION) == "none":
    lines.append(f"{'utilization':24}0 by construction (no fusion layers)")
  shares = ", ".join(f"m{m} {summary[names.rebalance_share(m)]:.1%}" for m in modalities)
  lines.append(f"{'re-balancing steps':24}{shares}")
  lines.append(f"{'training':24}{summary[names.STEPS]} steps, "
               f"{summary[names.TRAIN_SECONDS]:.1f} s, "
               f"{summary[names.SAMPLES_PER_S]:.0f} samples/s")
  return "\n".join(lines)
