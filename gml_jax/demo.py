"""Demo: greedy vs balanced training on a synthetic two-modality task (``make demo``).

Trains the Colored-MNIST model of the spec (two small CNN branches, MMTM after stages 2
and 3) on :mod:`gml_jax.synthetic`, whose colored modality carries an easy spurious cue,
once per method with the same seed and data, and prints for each: accuracy on the test
split where color is independent of the label (fused and per branch), accuracy on the
biased test split, the conditional utilization rates, the share of re-balancing steps and
the training speed.

    python -m gml_jax.demo                     # vanilla, random and guided
    python -m gml_jax.demo --methods guided --epochs 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import optax
from tqdm import tqdm

import gml_jax
from gml_jax import synthetic


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m gml_jax.demo",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--methods", default="vanilla,random,guided",
                      help="comma-separated methods to train: vanilla, random, guided")
  parser.add_argument("--epochs", type=int, default=6, help="training epochs per method")
  parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
  parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
  parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
  parser.add_argument("--alpha", type=float, default=0.01, help="imbalance threshold α (log10)")
  parser.add_argument("--window", type=int, default=5, help="re-balancing window Q (steps)")
  parser.add_argument("--warmup-epochs", type=int, default=1,
                      help="epochs of normal steps before balancing starts")
  parser.add_argument("--update", default="branch", choices=gml_jax.balancing.UPDATE_MODES,
                      help="what a re-balancing step updates: the branch (paper) or all")
  parser.add_argument("--width", type=int, default=32, help="channels of the first conv layer")
  parser.add_argument("--train-size", type=int, default=4096, help="training examples")
  parser.add_argument("--test-size", type=int, default=1024, help="examples per test split")
  parser.add_argument("--color-var", type=float, default=0.02,
                      help="variance σ² of the class-color jitter")
  parser.add_argument("--seed", type=int, default=0, help="seed of data, init and shuffling")
  parser.add_argument("--json", default=None, help="also write the results to this file")
  args = parser.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in args.methods if m not in gml_jax.balancing.METHODS]
  if unknown:
    parser.error(f"unknown method(s) {unknown}; expected some of {gml_jax.balancing.METHODS}")
  return args


def evaluate(eval_step, state, split, batch_size, mesh) -> tuple[float, np.ndarray]:
  """Accuracy of the fused prediction and of each branch over a whole split."""
  totals = None
  for batch in synthetic.batches(split, batch_size):
    sums = eval_step(state, gml_jax.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  return float(totals["correct"] / totals["count"]), totals["branch_correct"] / totals["count"]


def train_one(method: str, args: argparse.Namespace, data: dict, mesh) -> dict:
  """Trains one method and measures it."""
  model = gml_jax.small_cnn_fusion(synthetic.NUM_CLASSES, width=args.width)
  steps_per_epoch = len(data["train"]["label"]) // args.batch_size
  tx = gml_jax.balanced_multimodal(
      optax.sgd(args.lr, momentum=args.momentum), gml_jax.group_labels, method=method,
      alpha=args.alpha, window=args.window, warmup_steps=args.warmup_epochs * steps_per_epoch,
      update=args.update, seed=args.seed)
  example = [x[:1] for x in data["train"]["inputs"]]
  state = gml_jax.replicate(gml_jax.create_train_state(model, tx, example, args.seed), mesh)
  train_step = gml_jax.compile_train_step(gml_jax.make_train_step(model, tx), mesh)
  eval_step = gml_jax.compile_eval_step(gml_jax.make_eval_step(model), mesh)

  targets, started, steps = [], None, 0
  with tqdm(total=args.epochs * steps_per_epoch, desc=f"{method:>7}", unit="step") as bar:
    for epoch in range(args.epochs):
      for batch in synthetic.batches(data["train"], args.batch_size, seed=args.seed * 1000 + epoch):
        state, metrics = train_step(state, gml_jax.shard_batch(batch, mesh))
        targets.append(metrics["target"])
        steps += 1
        if started is None:  # time the steady state, not the compilation
          jax.block_until_ready(metrics)
          started, steps = time.perf_counter(), 0
        if steps % 25 == 0:
          m = jax.device_get(metrics)
          bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}",
                          d_speed=f"{m['d_speed']:+.3f}")
        bar.update()
  jax.block_until_ready(state)
  seconds = time.perf_counter() - started
  final = jax.device_get(metrics)

  accuracy, branch_accuracy = evaluate(eval_step, state, data["test"], args.batch_size, mesh)
  biased, _ = evaluate(eval_step, state, data["test_biased"], args.batch_size, mesh)
  util = gml_jax.conditional_utilization(
      model, jax.device_get(state.variables),
      synthetic.batches(data["train"], args.batch_size),
      synthetic.batches(data["test"], args.batch_size))
  targets = np.asarray(jax.device_get(targets))
  return {
      "method": method,
      "test_accuracy": accuracy,
      "test_branch_0_accuracy": float(branch_accuracy[0]),
      "test_branch_1_accuracy": float(branch_accuracy[1]),
      "test_biased_accuracy": biased,
      "u(m1|m0)": float(util.rates[1, 0]),
      "u(m0|m1)": float(util.rates[0, 1]),
      "d_util": util.d_util,
      "rebalance_share_m0": float(np.mean(targets == 0)),
      "rebalance_share_m1": float(np.mean(targets == 1)),
      "final_d_speed": float(final["d_speed"]),
      "steps": len(targets),
      "samples_per_s": steps * args.batch_size / seconds,
  }


COLUMNS = [
    ("method", "method", "{}"), ("test", "test_accuracy", "{:.3f}"),
    ("branch0", "test_branch_0_accuracy", "{:.3f}"), ("branch1", "test_branch_1_accuracy", "{:.3f}"),
    ("biased", "test_biased_accuracy", "{:.3f}"), ("u(m1|m0)", "u(m1|m0)", "{:+.3f}"),
    ("u(m0|m1)", "u(m0|m1)", "{:+.3f}"), ("d_util", "d_util", "{:+.3f}"),
    ("reb.m0", "rebalance_share_m0", "{:.2f}"), ("reb.m1", "rebalance_share_m1", "{:.2f}"),
    ("d_speed", "final_d_speed", "{:+.3f}"), ("samples/s", "samples_per_s", "{:.0f}"),
]


def format_table(results: list[dict]) -> str:
  rows = [[name for name, _, _ in COLUMNS]]
  rows += [[fmt.format(r[key]) for _, key, fmt in COLUMNS] for r in results]
  widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  mesh = gml_jax.data_mesh()
  data = synthetic.make_dataset(args.train_size, args.test_size, args.color_var, args.seed)
  print(f"Synthetic gray/colored glyphs: {args.train_size} train, {args.test_size} per test "
        f"split, {synthetic.NUM_CLASSES} classes; {mesh.size} {jax.default_backend()} device(s).")
  results = [train_one(method, args, data, mesh) for method in args.methods]
  print("\nTest: stroke color independent of the label; biased: color follows the label.")
  print("branchK: accuracy of branch K's own prediction; u(mj|mk): conditional utilization"
        " rate (negative: removing the modality helped);\nreb.mK: share of steps that"
        " re-balanced modality K; d_speed: s_0 - s_1 at the last step.\n")
  print(format_table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "results": results}, f, indent=2)
    print(f"\nWrote {args.json}")
  return results


if __name__ == "__main__":
  main()
