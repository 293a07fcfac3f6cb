"""The real job against its own step, like for like, with where the job's time goes.

Runs an experiment's job (``make demo``'s by default: guided Colored MNIST, 10 epochs) with
its sections timed by the trainer's clock (waits for batches, step calls, metric fetches,
which wait for the queued steps, and checkpoint saves), then the same compiled step alone on
one fixed batch of the job's data (same model, optimizer with its momentum and injected
learning rate, balancing, dtype, steps per call), then the job again. Prints samples/s of
each and their ratio.

  python -m benchmarks.job_vs_step                       # make demo's run
  python -m benchmarks.job_vs_step --config experiments/colored_mnist.py:vanilla \\
      --set steps_per_call=8
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import pathlib
import shutil
import time

import jax
import numpy as np

from gml_jax.parallel import compile_multi_step, compile_train_step, data_mesh
from gml_jax.runner import build, pipeline, trainer
from gml_jax.runner import dataset as datasets
from gml_jax.runner.loop import TrainClock
from gml_jax.steps import make_multi_step, make_train_step

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(spec: str, overrides: list[str]):
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("job_config", ROOT / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  for item in overrides:
    field, _, value = item.partition("=")
    parent, _, name = field.rpartition(".")
    node = build.config_field(config, parent) if parent else config
    node[name] = type(node[name])(value) if not isinstance(node[name], bool) else value == "True"
  return config


def job(config, workdir: pathlib.Path) -> tuple[dict, collections.Counter]:
  """The job, with its sections timed by the trainer's own clock: waits for batches, step
  calls, metric fetches (which wait for the queued steps), checkpoint saves."""
  shutil.rmtree(workdir, ignore_errors=True)
  clock = TrainClock()
  summary = trainer.train_and_evaluate(config, workdir, clock=clock)
  return summary, clock.sections


def step_alone(config, steps: int) -> float:
  """samples/s of the job's compiled step, ``steps`` steps on one fixed batch of its data."""
  data = datasets.open_dataset(config.data)
  spe = pipeline.steps_per_epoch(data.sources["train"], config.batch_size)
  model, tx = build.model(config, data.num_classes), build.optimizer(config, spe)
  mesh = data_mesh()
  state = build.initial_state(config, model, tx, data.example_inputs(), mesh)
  k = config.steps_per_call
  plan = [k] * max(1, steps // k)
  size, batch = next(pipeline.train_batches(data.sources["train"], data.prep,
                                            config.batch_size, config.seed, 0, 0, [k], mesh))
  step_fn = make_train_step(model, tx, compute_dtype=config.model.dtype,
                            loss=build.loss(config))
  compiled = (compile_train_step(step_fn, mesh) if k == 1 else
              compile_multi_step(make_multi_step(step_fn, k), mesh)).lower(state, batch).compile()
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in plan:
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  return len(plan) * size * config.batch_size / (time.perf_counter() - start)


def job_parser(description: str, workdir: str, example: str) -> argparse.ArgumentParser:
  """The flags of a benchmark that runs a job: --config, --set FIELD=VALUE (``example``
  in its help), --workdir (default runs/``workdir``)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--config", default="experiments/colored_mnist.py:guided")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help=f"config overrides, e.g. {example}")
  parser.add_argument("--workdir", default=str(ROOT / "runs" / workdir))
  return parser


def main(argv=None) -> dict:
  """Prints the three rates, the job's time breakdown and the ratios; returns the rates."""
  parser = job_parser(__doc__.splitlines()[0], "job_vs_step", "steps_per_call=8")
  parser.add_argument("--steps", type=int, default=400, help="steps of the step-alone timing")
  args = parser.parse_args(argv)
  config = load_config(args.config, args.set)
  workdir = pathlib.Path(args.workdir)

  rates = {}
  for name in ("job", "step alone", "job again"):
    if name == "step alone":
      rates[name] = step_alone(config, args.steps)
      print(f"{name:12} {rates[name]:7.0f} samples/s", flush=True)
      continue
    summary, seconds = job(config, workdir / name.replace(" ", "_"))
    rates[name] = summary["samples_per_s"]
    train = summary["train_seconds"]
    saves = seconds.pop("checkpoint saves")
    for outside in ("compile", "evaluation", "epoch utilization"):  # apart, or not at all
      seconds.pop(outside, None)
    parts = ", ".join(f"{k} {v:.1f} s ({v / train:.0%})" for k, v in seconds.most_common())
    print(f"{name:12} {rates[name]:7.0f} samples/s (train {train:.1f} s: {parts}; not in it: "
          f"checkpoint saves {saves:.1f} s, compile {summary['compile_seconds']:.1f} s; test "
          f"accuracy {summary['test_accuracy']:.3f})", flush=True)
  ratios = [rates[k] / rates["step alone"] for k in ("job", "job again")]
  print(f"job ÷ step alone: {ratios[0]:.2f} and {ratios[1]:.2f} "
        f"(mean {np.mean(ratios):.2f})")
  return rates


if __name__ == "__main__":
  main()
