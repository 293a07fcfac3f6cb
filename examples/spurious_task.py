"""A synthetic spurious-cue task and the training loop of the examples, on the library's steps.

Two modalities of a 4-class problem, generated in code:

* m₀ is informative but noisy: a class prototype plus Gaussian noise (16 features);
* m₁ is a cue: another class prototype with less noise (8 features). It follows the
  label in the training and validation data and is drawn independently of it at test time.

A greedy model leans on the cue and under-fits m₀, and fails on the test split. Both splits
are standardised with the training split's statistics (μ = ‖g‖²/‖θ‖² depends on the input
scale: see docs/tutorials/reading_speeds.md).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

import gml_jax

CLASSES = 4
BATCH = 64


def make_task(seed: int = 0, train_size: int = 2048, test_size: int = 1024) -> dict:
  """{"train": batches, "test": batches}: lists of ``{"inputs": (x0, x1), "label": y}``."""
  rng = np.random.default_rng(seed)
  informative, cue = rng.normal(size=(CLASSES, 16)), rng.normal(size=(CLASSES, 8))

  def split(size, cue_follows_label):
    y = rng.integers(0, CLASSES, size)
    cue_class = y if cue_follows_label else rng.integers(0, CLASSES, size)
    x0 = 0.8 * informative[y] + rng.normal(size=(size, 16))
    x1 = cue[cue_class] + 0.5 * rng.normal(size=(size, 8))
    return x0, x1, y

  train, test = split(train_size, True), split(test_size, False)
  mean, std = [x.mean(0) for x in train[:2]], [x.std(0) for x in train[:2]]
  standard = lambda xs: tuple(((x - m) / s).astype(np.float32) for x, m, s in zip(xs, mean, std))

  def batches(x0, x1, y):
    xs = standard((x0, x1))
    return [{"inputs": (xs[0][i:i + BATCH], xs[1][i:i + BATCH]),
             "label": y[i:i + BATCH].astype(np.int32)} for i in range(0, len(y), BATCH)]

  return {"train": batches(*train), "test": batches(*test)}


def run(model, labels, method: str, seed: int, task: dict, epochs: int = 12) -> dict:
  """Trains ``model`` with ``method`` (vanilla, random or guided) through the library's steps
  and measures it: test accuracies, utilization rates, re-balancing shares, d_speed."""
  steps_per_epoch = len(task["train"])
  tx = gml_jax.balanced_multimodal(optax.sgd(0.05, momentum=0.9), labels, method=method,
                                   warmup_steps=steps_per_epoch, seed=seed)
  state = gml_jax.create_train_state(model, tx, task["train"][0]["inputs"], seed=seed)
  gml_jax.check_masking(tx, state.params, labels)  # the transform is outermost: it masks
  train_step = jax.jit(gml_jax.make_train_step(model, tx, labels))
  eval_step = jax.jit(gml_jax.make_eval_step(model))
  order = np.random.default_rng(seed)
  d_speed = []
  for _ in range(epochs):
    for i in order.permutation(steps_per_epoch):
      state, metrics = train_step(state, task["train"][i])
      d_speed.append(float(metrics["d_speed"]))
  sums = jax.tree.map(lambda *x: sum(x), *[eval_step(state, b) for b in task["test"]])
  util = gml_jax.conditional_utilization(model, state.variables, task["train"], task["test"])
  balance = gml_jax.balance_state(state.opt_state)
  return {
      "test": float(sums["correct"] / sums["count"]),
      "branch_0": float(sums["branch_correct"][0] / sums["count"]),
      "branch_1": float(sums["branch_correct"][1] / sums["count"]),
      "d_util": util.d_util,
      "rebalancing": np.asarray(balance.rebalance_steps) / int(balance.step),
      "d_speed": np.asarray(d_speed),
      "warnings": gml_jax.speed_warnings(state.opt_state),
      "state": state,
  }


def report(make_model, labels, seeds, epochs: int = 12) -> dict:
  """Vanilla and guided over ``seeds`` on the task (``make_model(seed)`` builds a model): a
  table, and where d_speed sat in the vanilla runs (``gml_jax.describe_speeds``). Returns
  the results by method."""
  task = make_task()
  results = {m: [run(make_model(s), labels, m, s, task, epochs) for s in seeds]
             for m in ("vanilla", "guided")}
  print(f"{'method':8} {'test ŷ':>14} {'branch 0 (m₀)':>14} {'branch 1 (cue)':>14} "
        f"{'d_util':>14} {'re-bal. m₀/m₁':>14}")
  for method, runs in results.items():
    cell = lambda key, runs=runs: (f"{np.mean([r[key] for r in runs]):.3f} ± "
                                   f"{np.std([r[key] for r in runs]):.3f}")
    share = np.mean([r["rebalancing"] for r in runs], axis=0)
    print(f"{method:8} {cell('test'):>14} {cell('branch_0'):>14} {cell('branch_1'):>14} "
          f"{cell('d_util'):>14} {f'{share[0]:.0%} / {share[1]:.0%}':>14}")
  warmup = len(task["train"])
  for seed, r in zip(seeds, results["vanilla"]):
    d = gml_jax.describe_speeds(r["d_speed"][warmup:], alpha=0.01)
    print(f"vanilla seed {seed}: d_speed {d['mean']:+.3f} ± {d['std']:.3f} "
          f"[{d['min']:+.3f}, {d['max']:+.3f}], |d_speed| > α in {d['share_above_alpha']:.0%} "
          f"of steps, guided would favour m{d['favoured']}, median |d_speed| "
          f"{d['alpha_for_half']:.3f}")
    for warning in r["warnings"]:
      print("  warning:", warning)
  return results


def main(make_model, labels, description: str) -> None:
  """The examples' command line: ``--seeds N`` (seeds 0 .. N-1 per method), ``--epochs``."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per method")
  parser.add_argument("--epochs", type=int, default=12)
  args = parser.parse_args()
  report(make_model, labels, range(args.seeds), args.epochs)
