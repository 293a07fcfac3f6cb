"""Two processes on 127.0.0.1 (2 simulated devices each) against one process with 4."""

import json

import jax
import numpy as np
import pytest
from run_helpers import (
  MAIN,
  ONE_PROCESS_RUN,
  assert_states_close,
  cli_args,
  free_port,
  restore_latest,
  start_module,
  step_rows,
)

from gml_jax.runner import pipeline


@pytest.mark.xdist_group(ONE_PROCESS_RUN)
def test_two_processes_match_one_process(data_dir, one_process_run, tmp_path):
  port = free_port()
  procs = [start_module(MAIN, *cli_args("guided", tmp_path / "multi", data_dir, "--distributed",
                                         f"--coordinator_address=127.0.0.1:{port}",
                                         "--num_processes=2", f"--process_id={i}"), devices=2)
           for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "test accuracy" in outputs[0][0] and "test accuracy" not in outputs[1][0]

  multi_rows, single_rows = step_rows(tmp_path / "multi"), step_rows(one_process_run)
  assert [r["step"] for r in multi_rows] == list(range(1, 11))
  assert [r["target"] for r in multi_rows] == [r["target"] for r in single_rows]
  assert any(r["target"] >= 0 for r in multi_rows)
  for a, b in zip(multi_rows, single_rows):
    for key in ("loss", "accuracy", "s_0", "s_1", "d_speed"):
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
  (step_m, state_m), (step_s, state_s) = (restore_latest(tmp_path / "multi"),
                                          restore_latest(one_process_run))
  assert step_m == step_s == 10
  assert_states_close(state_m, state_s, rtol=1e-4, atol=1e-5)

  multi = json.loads((tmp_path / "multi" / "summary.json").read_text())
  single = json.loads((one_process_run / "summary.json").read_text())
  assert multi["test_examples"] == single["test_examples"] == 99  # odd: uneven shards
  for key in ("test_accuracy", "test_biased_accuracy", "best_val_accuracy", "u(m1|m0)"):
    assert multi[key] == pytest.approx(single[key], abs=1e-6), key


class _FakeSource:
  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"gray": np.full((2, 2, 1), i, np.uint8), "colored": np.zeros((2, 2, 3), np.uint8),
            "label": i}


@pytest.mark.parametrize("processes", [2, 3])
def test_eval_batches_cover_every_example_once_across_processes(processes, monkeypatch):
  source = _FakeSource(23)
  seen, batch_counts = [], []
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  for p in range(processes):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    prep = pipeline.Preprocess(("gray", "colored"))
    batches = list(pipeline.host_eval_batches(source, prep, 4 * processes))
    batch_counts.append(len(batches))
    for b in batches:
      assert len(b["label"]) == 4
      seen += b["label"][b["mask"] > 0].tolist()
  assert sorted(seen) == list(range(23))
  assert len(set(batch_counts)) == 1  # batches line up across processes
