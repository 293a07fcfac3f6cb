"""The benchmark harness runs and reports what it promises (JAX side; the PyTorch worker
needs torch, which `make bench` installs in a venv of its own)."""

import json

from benchmarks import bench


def test_bench_reports_times_compilations_and_ratios(tmp_path):
  out = tmp_path / "results.json"
  result = bench.main(["--workloads", "cnn_b64", "--methods", "vanilla,guided", "--repeats", "2",
                       "--steps", "2", "--steps-per-call", "2", "--no-torch", "--json", str(out)])
  rows = {(r["method"], r["impl"]): r for r in result["rows"]}
  assert set(rows) == {(m, i) for m in ("vanilla", "guided") for i in ("jax", "jax_x2", "plain")}
  for (method, impl), row in rows.items():
    assert row["step_ms"] > 0 and row["samples_per_s"] > 0
    if impl != "plain":
      assert row["compilations"] == 1  # normal and re-balancing steps share one compilation
      assert row["compile_s"] > 0 and row["xla_memory_mb"] > 0
  assert rows[("guided", "jax")]["modes_seen"] != [-1]  # re-balancing steps were timed
  ratios = {(r["method"], r["impl"]): r for r in result["ratios"]}
  assert ratios[("guided", "jax")]["over_vanilla"] > 0 and ratios[("guided", "jax")]["over_plain"] > 0
  assert json.loads(out.read_text())["versions"]["jax"]
