"""Metric logs (gml_jax/runner/logs.py): cut back to the restored step, a row cut by a kill
dropped."""

from gml_jax.runner import logs


def test_metric_log_drops_a_row_cut_by_a_kill_and_rows_past_the_checkpoint(tmp_path):
  path = tmp_path / "steps.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
  log = logs.MetricLog(path, resume_step=2)
  assert log.rows() == [{"step": 1}, {"step": 2}]
  log.append([{"step": 3, "loss": 0.5}])
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3, "loss": 0.5}\n'
