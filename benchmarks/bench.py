"""Train-step benchmark: gml_jax against a PyTorch reference of the same work (`make bench`).

For every workload (the Colored MNIST CNN pair at batch 64 and 256, the ModelNet40
ResNet-18 pair at 224x224, batch 8) and method (the paper's vanilla, random and guided,
and the field's OGM-GE, AGM, MMPareto, PMR and InfoReg with their defaults: any registered
method by name) it measures the steady-state step time and samples/s of

* ``jax``: gml_jax's compiled train step, one step per call;
* ``jax_xK``: K steps per compiled call (``gml_jax.steps.make_multi_step``), when asked;
* ``plain``: the same model, loss and SGD step in JAX without the balancing transform,
  to measure what balancing costs;
* ``torch``: the PyTorch reference (``benchmarks/torch_reference.py``), in a worker process
  of its own interpreter, with the authors' way of bookkeeping (host sync per tensor);

interleaved (jax, torch, jax, torch, ...) so that both see the same machine load, and
reports medians over the repeats, compile time, compilations per model across all modes
(normal and re-balancing steps of each modality), XLA's memory estimate of the step, and
the ratios torch ÷ jax step time (> 1: JAX faster) and each method ÷ vanilla and ÷ plain.
Every implementation of every method runs once per round, round after round, so the
ratios are measured side by side. PMR's prototype pass (once per epoch, outside the step)
is reported apart, in milliseconds per batch.

  python -m benchmarks.bench --torch-python .venv-torch/bin/python
  python -m benchmarks.bench --workloads cnn_b64 --repeats 3 --no-torch
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gml_jax
from benchmarks.workloads import ALPHA, DEFAULT_WORKLOADS, LEARNING_RATE, WINDOW, WORKLOADS
from gml_jax import parallel, steps

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What the registered methods' windows and epoch passes are sized by: Colored MNIST's run
# (4,500 training digits at batch 64, 10 epochs); PMR's prototype pass is timed over
# EPOCH_PASS_BATCHES batches in evaluation mode.
STEPS_PER_EPOCH, NUM_EPOCHS, EPOCH_PASS_BATCHES = 70, 10, 4
# A row per method: the paper's three, then the field's (their authors' recipes).
PAPER_METHODS = ("vanilla", "random", "guided")  # the library's balanced_multimodal alone
DEFAULT_METHODS = (*PAPER_METHODS, "ogm_ge", "agm", "mmpareto", "pmr", "inforeg")


def build_model(workload: dict):
  return gml_jax.models.build(workload["model"], workload["classes"])


def peak_memory_mb() -> float | None:
  """The device's peak memory in use so far (accelerators; None where JAX does not say)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def host_batches(workload: dict, count: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  frames = (workload["frames"],) if "frames" in workload else ()
  shape = lambda c: (workload["batch"], *frames, workload["size"], workload["size"], c)
  return [{"inputs": tuple(rng.normal(size=shape(c)).astype(np.float32)
                           for c in workload["channels"]),
           "label": rng.integers(0, workload["classes"], workload["batch"]).astype(np.int32)}
          for _ in range(count)]


# --------------------------------------------------------------------------------------
# JAX runners: each returns a function run(steps) -> seconds, after compiling.


def method_optimizer(workload: dict, method: str, model, example_inputs):
  """(tx, loss) of a run of ``method`` with plain SGD inside: the paper's methods (vanilla,
  random, guided) from the library alone, with α = 0 for guided and no warm-up, which keeps
  re-balancing busy so that every mode is compiled and timed; every other registered method
  (``gml_jax/runner/methods/``: OGM-GE, AGM, MMPareto, PMR, InfoReg) with its defaults (its
  authors' recipe) inside the balancing transform in method "vanilla", as the runner builds
  it, so that its ratio to vanilla is what the method adds."""
  sgd = optax.sgd(LEARNING_RATE)
  if method in PAPER_METHODS:
    return gml_jax.balanced_multimodal(sgd, gml_jax.group_labels, method=method,
                                       alpha=0.0 if method == "guided" else ALPHA,
                                       window=WINDOW, warmup_steps=0, seed=0), "branches"
  from gml_jax.runner import build, methods  # the runner: not on device images

  registered = methods.variant_method(method)
  if method != registered.name:
    raise ValueError(f"--methods: {method!r} is a variant of {registered.name!r}; the "
                     "benchmark times methods with their defaults.")
  variables = model.init(jax.random.key(0), tuple(example_inputs), train=False)
  context = methods.Context(
      seed=0, steps_per_epoch=STEPS_PER_EPOCH, num_epochs=NUM_EPOCHS,
      num_modalities=len(workload["channels"]), labels=gml_jax.group_labels,
      encoder_labels=gml_jax.models.encoder_labels, num_classes=workload["classes"],
      feature_dims=lambda: gml_jax.pmr.feature_dims(model, variables, example_inputs))
  return build.wrapped(registered, sgd, registered.defaults(), context), (
      registered.loss or "branches")


def start_epoch(model, workload: dict, state):
  """The transforms' epoch hook before the first timed step (:mod:`gml_jax.epochs`), and
  the milliseconds per batch of PMR's prototype pass (None for a hook without one):
  reported apart from the step, as a run reports its epoch passes."""
  needs = gml_jax.epochs.epoch_needs(state.opt_state)
  inputs = {"params": state.params} if "params" in needs else {}
  pass_ms = None
  if "prototype_sums" in needs:
    step = jax.jit(gml_jax.pmr.make_prototype_step(model, workload["classes"]))
    batches = host_batches(workload, EPOCH_PASS_BATCHES, seed=1)
    jax.block_until_ready(step(state.variables, batches[0]))  # compile
    start = time.perf_counter()
    sums = jax.block_until_ready(gml_jax.pmr.prototype_pass(step, state.variables, batches))
    pass_ms = 1e3 * (time.perf_counter() - start) / len(batches)
    inputs["prototype_sums"] = sums
  return state.replace(opt_state=gml_jax.epochs.epoch_start(state.opt_state, **inputs)), pass_ms


class JaxRunner:
  """gml_jax's train step for one workload and method, ``steps_per_call`` steps a call."""

  def __init__(self, workload: dict, method: str, steps_per_call: int = 1,
               dtype: str = "float32"):
    self.model = build_model(workload)
    self.mesh = gml_jax.data_mesh()
    example = host_batches(workload, 1)[0]["inputs"]
    tx, loss = method_optimizer(workload, method, self.model, [x[:1] for x in example])
    state = gml_jax.create_train_state(self.model, tx, [x[:1] for x in example], 0)
    self.epoch_pass_ms = None
    if gml_jax.epochs.epoch_needs(state.opt_state):  # PMR, InfoReg: their first epoch's hook
      state, self.epoch_pass_ms = start_epoch(self.model, workload, state)
    self.state = gml_jax.replicate(state, self.mesh)
    self.traces = 0
    step = gml_jax.make_train_step(self.model, tx, compute_dtype=dtype, loss=loss)

    def counted(state, batch):
      self.traces += 1
      return step(state, batch)

    self.k = steps_per_call
    if steps_per_call == 1:
      self.fn = gml_jax.compile_train_step(counted, self.mesh)
      self.batch = gml_jax.shard_batch(host_batches(workload, 1)[0], self.mesh)
    else:
      self.fn = parallel.compile_multi_step(steps.make_multi_step(counted, steps_per_call),
                                         self.mesh)
      stacked = parallel.stack_batches(host_batches(workload, steps_per_call))
      self.batch = parallel.shard_stacked_batches(stacked, self.mesh)
    start = time.perf_counter()
    compiled = self.fn.lower(self.state, self.batch).compile()
    self.compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    self.memory_bytes = (None if memory is None else int(
        memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes))
    self.targets = set()

  def run(self, steps: int) -> float:
    calls = max(1, steps // self.k)
    self.state, metrics = self.fn(self.state, self.batch)  # warm (first call compiles)
    jax.block_until_ready(metrics)
    targets = []  # device arrays: collected without a host sync per step
    start = time.perf_counter()
    for _ in range(calls):
      self.state, metrics = self.fn(self.state, self.batch)
      targets.append(metrics["target"])
    jax.block_until_ready(self.state)
    seconds = time.perf_counter() - start
    self.targets.update(np.ravel(jax.device_get(targets)).tolist())
    return seconds / (calls * self.k)


class PlainRunner:
  """The same model, loss and SGD step without the balancing transform."""

  def __init__(self, workload: dict, dtype: str = "float32"):
    model = build_model(workload)
    mesh = gml_jax.data_mesh()
    tx = optax.sgd(LEARNING_RATE)
    example = host_batches(workload, 1)[0]
    variables = model.init(jax.random.key(0), tuple(x[:1] for x in example["inputs"]),
                           train=False)
    params = variables.pop("params")
    self.state = gml_jax.replicate((params, dict(variables), tx.init(params)), mesh)

    def step(state, batch):
      params, model_state, opt_state = state

      def loss_fn(p):
        cast = lambda tree: steps.cast_floats(tree, dtype)
        (_, branch_logits), new_state = model.apply(
            {"params": cast(p), **model_state}, cast(tuple(batch["inputs"])), train=True,
            mutable=list(model_state))
        branch_logits = branch_logits.astype(jnp.float32)
        losses = steps.branch_cross_entropy(branch_logits, batch["label"])
        return jnp.sum(jnp.mean(losses, axis=-1)), new_state

      grads, new_state = jax.grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), new_state, opt_state), None

    self.fn = jax.jit(step, donate_argnums=0)
    self.batch = gml_jax.shard_batch(example, mesh)

  def run(self, steps: int) -> float:
    self.state, _ = self.fn(self.state, self.batch)
    jax.block_until_ready(self.state)
    start = time.perf_counter()
    for _ in range(steps):
      self.state, _ = self.fn(self.state, self.batch)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / steps


class TorchWorker:
  """The PyTorch reference in its own interpreter, driven over a pipe."""

  def __init__(self, python: str):
    self.proc = subprocess.Popen(
        [python, "-m", "benchmarks.torch_reference"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, cwd=ROOT)

  def ask(self, **msg) -> dict:
    self.proc.stdin.write(json.dumps(msg) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("The PyTorch worker exited; run it by hand to see why: "
                         f"{self.proc.args[0]} -m benchmarks.torch_reference (from {ROOT})")
    return json.loads(line)

  def close(self):
    self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
    self.proc.stdin.close()
    self.proc.wait(timeout=30)


# --------------------------------------------------------------------------------------


def bench_workload(name: str, args, torch: TorchWorker | None) -> list[dict]:
  """Every method and dtype of one workload, every implementation of every method timed
  once per round, round after round (their ratios are measured side by side)."""
  workload = WORKLOADS[name]
  cnn = workload["model"] == "small_cnn"
  steps = args.steps if cnn else args.resnet_steps  # ResNet-18 and I3D: slow steps
  if not workload.get("torch", True):
    torch = None
  rows = []
  for dtype in args.dtypes:
    plain = PlainRunner(workload, dtype)
    torch_info = torch.ask(cmd="setup", workload=name, seed=0, dtype=dtype) if torch else None
    runners, times = {}, {}
    for method in args.methods:
      runners[method] = {"jax": JaxRunner(workload, method, dtype=dtype)}
      for k in args.steps_per_call if cnn else args.resnet_steps_per_call:
        runners[method][f"jax_x{k}"] = JaxRunner(workload, method, k, dtype)
      times[method] = {key: [] for key in [*runners[method], "plain", "torch"]}
    torch_memory = {}
    for _ in range(args.repeats):  # interleaved: every implementation once per round
      for method in args.methods:
        for key, runner in runners[method].items():
          times[method][key].append(runner.run(steps))
        times[method]["plain"].append(plain.run(steps))
        if torch and method in PAPER_METHODS:  # the reference has the paper's methods only
          reply = torch.ask(cmd="run", method=method, steps=steps)
          times[method]["torch"].append(reply["seconds"] / steps)
          torch_memory[method] = reply.get("peak_mb")
    for method in args.methods:
      for key, samples in times[method].items():
        if not samples:
          continue
        median = statistics.median(samples)
        runner = runners[method].get(key)
        rows.append({
            "workload": name, "method": method, "dtype": dtype, "impl": key,
            "step_ms": 1e3 * median, "samples_per_s": workload["batch"] / median,
            "spread_pct": 100 * (max(samples) - min(samples)) / median,
            "compile_s": getattr(runner, "compile_seconds", None),
            "compilations": getattr(runner, "traces", None),
            "modes_seen": sorted(runner.targets) if runner else None,
            "xla_memory_mb": (runner.memory_bytes / 2**20
                              if runner and runner.memory_bytes is not None else None),
            "peak_memory_mb": torch_memory.get(method) if key == "torch" else peak_memory_mb(),
            "params": torch_info["params"] if key == "torch" and torch_info else None,
            "epoch_pass_ms": getattr(runner, "epoch_pass_ms", None),
        })
  return rows


def ratios(rows: list[dict]) -> list[dict]:
  """torch ÷ jax per workload, method and dtype; the balancing overheads; bfloat16 ÷ float32."""
  at = {(r["workload"], r["method"], r["dtype"], r["impl"]): r["step_ms"] for r in rows}
  out = []
  for (w, m, d, impl), ms in at.items():
    if not impl.startswith("jax"):
      continue
    entry = {"workload": w, "method": m, "dtype": d, "impl": impl}
    if (w, m, d, "torch") in at:
      entry["torch_over_jax"] = at[(w, m, d, "torch")] / ms
    if (w, "vanilla", d, impl) in at:
      entry["over_vanilla"] = ms / at[(w, "vanilla", d, impl)]
    if impl == "jax" and (w, m, d, "plain") in at:
      entry["over_plain"] = ms / at[(w, m, d, "plain")]
    if d != "float32" and (w, m, "float32", impl) in at:
      entry["over_float32"] = ms / at[(w, m, "float32", impl)]
    out.append(entry)
  return out


def format_tables(rows, ratio_rows) -> str:
  fmt = lambda v, f: format(v, f) if v is not None else "-"
  lines = [f"{'workload':12} {'method':8} {'dtype':9} {'impl':8} {'ms/step':>9} "
           f"{'samples/s':>10} {'spread':>7} {'compile s':>9} {'compiles':>8} {'XLA MB':>7} "
           f"{'peak MB':>8} {'epoch pass ms/batch':>19}"]
  for r in rows:
    lines.append(f"{r['workload']:12} {r['method']:8} {r['dtype']:9} {r['impl']:8} "
                 f"{r['step_ms']:9.2f} {r['samples_per_s']:10.0f} {r['spread_pct']:6.0f}% "
                 f"{fmt(r['compile_s'], '9.1f'):>9} {fmt(r['compilations'], 'd'):>8} "
                 f"{fmt(r['xla_memory_mb'], '7.0f'):>7} {fmt(r['peak_memory_mb'], '8.0f'):>8} "
                 f"{fmt(r.get('epoch_pass_ms'), '19.2f'):>19}")
  lines += ["", f"{'workload':12} {'method':8} {'dtype':9} {'impl':8} {'torch/jax':>9} "
                f"{'÷vanilla':>9} {'÷plain':>7} {'÷float32':>9}"]
  for r in ratio_rows:
    val = lambda k, r=r: f"{r[k]:.3f}" if k in r else "-"
    lines.append(f"{r['workload']:12} {r['method']:8} {r['dtype']:9} {r['impl']:8} "
                 f"{val('torch_over_jax'):>9} {val('over_vanilla'):>9} {val('over_plain'):>7} "
                 f"{val('over_float32'):>9}")
  return "\n".join(lines)


# `--device-report`: what one GPU (or TPU) host should report, in a few minutes; any flag
# given as well overrides these.
DEVICE_REPORT = {"workloads": "cnn_b256,resnet18_b32,i3d_b8", "methods": "vanilla,guided",
                 "dtypes": "float32,bfloat16", "repeats": 3, "steps": 30, "resnet_steps": 10,
                 "steps_per_call": "8", "resnet_steps_per_call": "", "pipelines": "",
                 "json": "benchmarks/results_device.json"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--device-report", action="store_true",
                      help="the accelerator report: JAX vs PyTorch (same interpreter, "
                           "--torch-python defaults to it) in float32 and bfloat16: "
                           f"{DEVICE_REPORT}")
  parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                      help=f"comma-separated, of {list(WORKLOADS)}")
  parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                      help="comma-separated: the paper's (vanilla, random, guided) or any "
                           "registered method (gml_jax/runner/methods/) with its defaults")
  parser.add_argument("--dtypes", default="float32",
                      help="compute dtypes, comma-separated: float32, bfloat16")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
  parser.add_argument("--steps", type=int, default=40, help="timed steps per round (CNN)")
  parser.add_argument("--resnet-steps", type=int, default=4,
                      help="timed steps per round (ResNet-18)")
  parser.add_argument("--steps-per-call", default="8",
                      help="also time K steps per compiled call, for each K (comma-separated;"
                           " empty: none), CNN workloads")
  parser.add_argument("--resnet-steps-per-call", default="4",
                      help="the same for the ResNet-18 workload (its unrolled calls compile "
                           "slowly)")
  parser.add_argument("--torch-python", default=None,
                      help="interpreter with torch==2.13.0 for the PyTorch reference")
  parser.add_argument("--no-torch", action="store_true", help="JAX only")
  parser.add_argument("--pipelines",
                      default="colored_mnist,modelnet40_png,modelnet40_224px,nvgesture",
                      help="input-pipeline workloads, comma-separated (empty: none); need the "
                           "experiments extra")
  parser.add_argument("--pipeline-threads", default="1,2",
                      help="reading threads to time each pipeline with, comma-separated")
  parser.add_argument("--pipeline-batches", type=int, default=30, help="timed batches")
  parser.add_argument("--json", default="benchmarks/results.json", help="output JSON file")
  if "--device-report" in (argv if argv is not None else sys.argv[1:]):
    parser.set_defaults(**DEVICE_REPORT, torch_python=sys.executable)
  args = parser.parse_args(argv)
  args.workloads = [w for w in args.workloads.split(",") if w]
  unknown = [w for w in args.workloads if w not in WORKLOADS]
  if unknown:
    parser.error(f"unknown workloads {unknown}; expected some of {list(WORKLOADS)}")
  args.methods = [m for m in args.methods.split(",") if m]
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  args.pipelines = [p for p in args.pipelines.split(",") if p]
  args.pipeline_threads = [int(n) for n in args.pipeline_threads.split(",") if n]
  if set(args.dtypes) - {"float32", "bfloat16"}:
    parser.error(f"unknown dtypes {args.dtypes}; expected float32 and/or bfloat16")
  args.steps_per_call = [int(k) for k in args.steps_per_call.split(",") if k]
  args.resnet_steps_per_call = [int(k) for k in args.resnet_steps_per_call.split(",") if k]
  if not args.no_torch and not args.torch_python:
    parser.error("give --torch-python (an interpreter with torch) or --no-torch")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  torch = None if args.no_torch else TorchWorker(args.torch_python)
  rows = []
  try:
    for name in args.workloads:
      print(f"benchmarking {name} ...", flush=True)
      rows += bench_workload(name, args, torch)
  finally:
    if torch:
      torch.close()
  ratio_rows = ratios(rows)
  pipeline_rows = []
  if args.pipelines:  # grain and the runner: the experiments extra (not on device images)
    from benchmarks import pipelines

    for name in args.pipelines:
      print(f"benchmarking the {name} input pipeline ...", flush=True)
      pipeline_rows += pipelines.bench_pipeline(name, args.pipeline_threads,
                                                args.pipeline_batches)
  result = {
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpus": os.cpu_count(), "device": str(jax.devices()[0]),
                  "device_count": jax.device_count()},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "flax": flax.__version__, "optax": optax.__version__},
      "command": " ".join(["python -m benchmarks.bench", *(argv or sys.argv[1:])]),
      "rows": rows, "ratios": ratio_rows, "pipelines": pipeline_rows,
  }
  print(format_tables(rows, ratio_rows))
  if pipeline_rows:
    step_rates = {r["workload"]: r["samples_per_s"] for r in rows
                  if r["impl"] == "jax" and r["method"] == "guided" and r["dtype"] == "float32"}
    print("\nInput pipelines (host batches; step/s: the guided step they feed, 1 step/call):")
    print(pipelines.format_table(pipeline_rows, step_rates))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nWrote {args.json}")
  return result


if __name__ == "__main__":
  main()
