"""The benchmark harness runs and reports what it promises (JAX side; the PyTorch worker
needs torch, which `make bench` installs in a venv of its own)."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
from run_helpers import BLOCK_HEAVY, DUMMY, ROOT, cli_env, run_module


# The benchmark and the device report time the same float32 programs of cnn_b64, each in a
# process on one device as `make bench` and `make bench-device` run them: on one xdist
# worker, the second finds them in the worker's compilation cache.
@pytest.mark.xdist_group("cnn_b64")
def test_bench_reports_times_compilations_and_ratios(tmp_path):
  out = tmp_path / "results.json"
  run = run_module("benchmarks.bench", "--workloads", "cnn_b64", "--methods",
                   "vanilla,guided,pmr",
                   "--repeats", "2", "--steps", "2", "--steps-per-call", "2", "--no-torch",
                   "--json", str(out), "--pipelines", "colored_mnist,modelnet40_png",
                   "--pipeline-threads", "1,2", "--pipeline-batches", "3")
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = {(r["method"], r["impl"]): r for r in result["rows"]}
  assert set(rows) == {(m, i) for m in ("vanilla", "guided", "pmr")
                       for i in ("jax", "jax_x2", "plain")}
  assert {r["dtype"] for r in result["rows"]} == {"float32"}
  for (_method, impl), row in rows.items():
    assert row["step_ms"] > 0 and row["samples_per_s"] > 0
    if impl != "plain":
      assert row["compilations"] == 1  # normal and re-balancing steps share one compilation
      assert row["compile_s"] > 0 and row["xla_memory_mb"] > 0
  assert rows[("guided", "jax")]["modes_seen"] != [-1]  # re-balancing steps were timed
  ratios = {(r["method"], r["impl"]): r for r in result["ratios"]}
  guided = ratios[("guided", "jax")]
  assert guided["over_vanilla"] > 0 and guided["over_plain"] > 0
  # A registered method (its defaults, through the registry): its ratio, and its epoch
  # pass timed apart from the step.
  assert ratios[("pmr", "jax")]["over_vanilla"] > 0
  assert rows[("pmr", "jax")]["epoch_pass_ms"] > 0
  assert rows[("guided", "jax")]["epoch_pass_ms"] is None
  assert result["versions"]["jax"]
  pipelines = {(r["pipeline"], r["threads"]): r for r in result["pipelines"]}
  assert set(pipelines) == {(p, n) for p in ("colored_mnist", "modelnet40_png") for n in (1, 2)}
  assert all(r["train_samples_per_s"] > 0 and r["eval_samples_per_s"] > 0
             for r in pipelines.values())
  assert pipelines[("colored_mnist", 1)]["feeds"] == "cnn_b64"


@pytest.mark.xdist_group("cnn_b64")
def test_device_report_runs_with_only_the_library_stack(tmp_path):
  # The accelerator machines have jax, flax, optax, chex and torch only: the report must not
  # touch the runner's dependencies (blocked here), and runs on CPU in a tiny configuration,
  # on one device as there (8 simulated devices: 59 s against 44 s for one).
  out = tmp_path / "device.json"
  code = BLOCK_HEAVY + textwrap.dedent(f"""
      from benchmarks import bench
      bench.main(["--device-report", "--workloads", "cnn_b64", "--repeats", "1", "--steps",
                  "2", "--steps-per-call", "2", "--no-torch", "--json", {str(out)!r}])
      """)
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(1),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads(out.read_text())
  rows = {(r["method"], r["dtype"], r["impl"]) for r in saved["rows"]}
  assert rows == {(m, d, i) for m in ("vanilla", "guided") for d in ("float32", "bfloat16")
                  for i in ("jax", "jax_x2", "plain")}
  assert all(r["compilations"] == 1 for r in saved["rows"] if r["impl"] != "plain")
  bf16 = [r for r in saved["ratios"] if r["dtype"] == "bfloat16"]
  assert bf16 and all(r["over_float32"] > 0 for r in bf16)
  assert "÷float32" in result.stdout


def test_job_against_its_step_reports_rates_and_where_the_time_goes(data_dir, tmp_path):
  # A process on one device, as `make bench` runs it: the tiny run's programs are those the
  # other tests' runs compiled (in the test process they would compile for 8 devices).
  result = run_module(
      "benchmarks.job_vs_step", "--set", f"data.data_dir={data_dir}", "--set",
      f"data.manual_dir={DUMMY}", "--set", "model.small_cnn.width=4", "--set", "batch_size=32",
      "--set", "num_epochs=2", "--steps", "10", "--workdir", str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  rates = {name: float(re.search(rf"^{name} +(\d+) samples/s", out, re.M).group(1))
           for name in ("job", "step alone", "job again")}
  assert min(rates.values()) > 0
  for part in ("metric fetches", "checkpoint saves", "waiting for batches", "step calls"):
    assert part in out
  assert "job ÷ step alone:" in out
  summary = (tmp_path / "job" / "summary.json").read_text()
  assert '"steps": 10' in summary  # the tiny config ran: 5 steps an epoch, 2 epochs


def test_epoch_utilization_cost_side_by_side(data_dir, tmp_path):
  result = run_module(
      "benchmarks.epoch_utilization", "--set", f"data.data_dir={data_dir}", "--set",
      f"data.manual_dir={DUMMY}", "--set", "model.small_cnn.width=4", "--set", "batch_size=32",
      "--set", "num_epochs=2", "--set", "utilization_train_examples=50", "--workdir",
      str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert [line[:12].strip() for line in lines[-3:]] == ["off", "first 50", "all"]
  walls = [float(re.search(r" wall +([\d.]+) s", line).group(1)) for line in lines[-3:]]
  assert min(walls) > 0
  assert "(1.00x off)" in lines[-3] and "epoch-end utilization   0.0 s" in lines[-3]
  # The two runs that measured it: 2 epochs, a row of rates each; the run without: none.
  rows = lambda name: [json.loads(x) for x in (tmp_path / name / "metrics" / "epochs.jsonl")
                       .read_text().splitlines()]
  assert all("val_d_util" in r for r in rows("first_50_0") + rows("all_0"))
  assert not any("val_d_util" in r for r in rows("off_0"))
