"""The cost of measuring the utilization rates at every epoch end, side by side.

Runs a job (``make demo``'s by default: guided Colored MNIST, 10 epochs) without the
per-epoch rates, with their means from the config's first ``utilization_train_examples``
training examples, and from all of them, interleaved over ``--rounds``; prints for each the
wall time, the training time, the time the epoch-end utilization took (the trainer's clock)
and the wall time against the run without.

  python -m benchmarks.epoch_utilization
  python -m benchmarks.epoch_utilization --set num_epochs=3 --rounds 2
"""

from __future__ import annotations

import collections
import pathlib
import time

import numpy as np

from benchmarks.job_vs_step import job, job_parser, load_config


def main(argv=None) -> dict:
  """Prints one line per setting; returns {setting: mean wall seconds}."""
  parser = job_parser(__doc__.splitlines()[0], "epoch_utilization", "num_epochs=3")
  parser.add_argument("--rounds", type=int, default=1, help="runs of each setting, interleaved")
  args = parser.parse_args(argv)
  config = load_config(args.config, args.set)
  first = config.utilization_train_examples or 1000
  settings = {"off": (False, 0), f"first {first}": (True, first), "all": (True, 0)}

  measured = collections.defaultdict(list)  # setting -> (wall, train, utilization) per run
  for r in range(args.rounds):
    for name, (on, examples) in settings.items():
      config.utilization_every_epoch, config.utilization_train_examples = on, examples
      start = time.perf_counter()
      summary, seconds = job(config, pathlib.Path(args.workdir) / f"{name.replace(' ', '_')}_{r}")
      measured[name].append((time.perf_counter() - start, summary["train_seconds"],
                             seconds.get("epoch utilization", 0.0)))
  walls = {name: float(np.mean([m[0] for m in runs])) for name, runs in measured.items()}
  for name, runs in measured.items():
    wall, train, utilization = np.mean(runs, axis=0)
    print(f"{name:12} wall {wall:6.1f} s ({wall / walls['off']:.2f}x off), train {train:6.1f} s, "
          f"epoch-end utilization {utilization:5.1f} s ({utilization / config.num_epochs:.2f} s "
          f"an epoch)", flush=True)
  return walls


if __name__ == "__main__":
  main()
