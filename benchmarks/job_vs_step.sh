#!/usr/bin/env bash
# The real job against its own step, side by side: `make demo`'s run (guided Colored MNIST,
# compilation excluded), then the step alone (make bench's harness), then the run again.
# Usage: benchmarks/job_vs_step.sh [extra --config.<field>=<value> for the runs]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export XLA_FLAGS="${XLA_FLAGS:---xla_cpu_experimental_ynn_fusion_type=-individual_convolution}"
out=runs/job_vs_step
rm -rf "$out"
run() {
  "$PY" -m gml_jax.runner.main --config experiments/colored_mnist.py:guided --workdir "$out/$1" "${@:2}" > /dev/null 2>&1
  "$PY" -c "import json; s = json.load(open('$out/$1/summary.json')); print(f\"job $1: {s['samples_per_s']:.0f} samples/s (train {s['train_seconds']:.1f} s, compile {s['compile_seconds']:.1f} s)\")"
}
run first "$@"
"$PY" -m benchmarks.bench --workloads cnn_b64 --methods guided --repeats 3 --steps 40 \
  --steps-per-call "" --no-torch --pipelines "" --json "$out/bench.json" | grep -E "^(workload|cnn_b64)"
run second "$@"
