"""Faults: real training processes stopped by SIGTERM or killed by SIGKILL, diverging
losses, corrupt data, foreign checkpoints, impossible configs. Nothing written is lost."""

import pathlib
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from gml_jax.runner import pipeline, trainer, workdir
from run_helpers import (ROOT, assert_states_close, cli_command, cli_env, restore_latest,
                         step_rows, tiny_config)

# 4 epochs of 5 steps, metrics fetched every step so that a signal is seen at once.
RUN = dict(num_epochs=4, log_every_steps=1)


def _start(workdir, data_dir, **overrides):
  return subprocess.Popen(cli_command("random", workdir, data_dir, **(RUN | overrides)),
                          cwd=ROOT, env=cli_env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_steps(workdir, count, proc, timeout=120):
  deadline = time.time() + timeout
  while len(step_rows(workdir)) < count:
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert time.time() < deadline
    time.sleep(0.05)


def _finish(workdir, data_dir, **overrides):
  proc = _start(workdir, data_dir, **overrides)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return out


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted run: (steps.jsonl rows, final state)."""
  workdir = tmp_path_factory.mktemp("reference")
  _finish(workdir, data_dir)
  return step_rows(workdir), restore_latest(workdir)


def _same_trajectory(workdir, reference):
  rows, (ref_step, ref_state) = reference
  resumed = step_rows(workdir)
  assert [r["step"] for r in resumed] == list(range(1, 21))
  assert [r["target"] for r in resumed] == [r["target"] for r in rows]
  np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in rows], rtol=1e-5)
  step, state = restore_latest(workdir)
  assert step == ref_step == 20
  assert_states_close(state, ref_state)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_checkpoints_and_resumes_exactly(sig, data_dir, reference, tmp_path):
  proc = _start(tmp_path, data_dir)
  _wait_for_steps(tmp_path, 7, proc)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "Stopped by a stop signal at step" in out
  stopped_at = int(out.split("at step ")[1].split(";")[0])
  assert 7 <= stopped_at < 20
  assert restore_latest(tmp_path)[0] == stopped_at  # the checkpoint is at the stop step
  assert "Resuming" in _finish(tmp_path, data_dir)
  _same_trajectory(tmp_path, reference)


def test_sigkill_mid_save_loses_at_most_the_unsaved_steps(data_dir, reference, tmp_path):
  # A checkpoint every step: most kills land inside a save.
  for kill_after_steps, delay in ((4, 0.0), (9, 0.15), (13, 0.3)):
    proc = _start(tmp_path, data_dir, checkpoint_every_steps=1)
    _wait_for_steps(tmp_path, kill_after_steps, proc)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    done = len(step_rows(tmp_path))
    saved, _ = restore_latest(tmp_path)  # always restorable
    assert done - 2 <= saved <= done  # lost: at most the step being saved and the next
  _finish(tmp_path, data_dir, checkpoint_every_steps=1)
  _same_trajectory(tmp_path, reference)


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  config = tiny_config("guided", data_dir)
  config.optimizer.learning_rate, config.optimizer.momentum = 1e6, 0.0
  config.log_every_steps, config.checkpoint_every_steps = 1, 1
  with pytest.raises(FloatingPointError, match=r"The training loss is (nan|inf) at step \d+"):
    trainer.train_and_evaluate(config, tmp_path)
  if (tmp_path / "checkpoints" / "latest").exists() and any(
      (tmp_path / "checkpoints" / "latest").iterdir()):
    _, state = restore_latest(tmp_path)
    for leaf in __import__("jax").tree.leaves(state):
      assert np.all(np.isfinite(leaf))


def test_corrupt_dataset_files_are_named(data_dir, tmp_path):
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir, copy)
  (train_file,) = copy.glob("colored_mnist/*/*/*-train.array_record*")
  data = train_file.read_bytes()
  train_file.write_bytes(data[: len(data) // 2])
  config = tiny_config("guided", copy)
  with pytest.raises(pipeline.DatasetCorruptError,
                     match=r"(?s)split 'train'.*corrupt or truncated; delete"):
    trainer.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()


def test_checkpoint_of_another_model_is_refused(data_dir, tmp_path):
  small = tiny_config("guided", data_dir)
  trainer.train_and_evaluate(small, tmp_path / "small", stop_after_steps=2)
  wide = tiny_config("guided", data_dir)
  wide.model.width = 8
  shutil.copytree(tmp_path / "small" / "checkpoints", tmp_path / "wide" / "checkpoints")
  with pytest.raises(ValueError, match="does not fit this model and optimizer"):
    trainer.train_and_evaluate(wide, tmp_path / "wide")
  assert restore_latest(tmp_path / "wide")[0] == 2  # the foreign checkpoint is untouched


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 12, "batch_size=12 is not divisible by the 8 devices"),
    ("eval_batch_size", 20, "eval_batch_size=20 is not divisible by the 8 devices"),
    ("balance.alpha", -0.5, "alpha must be a number >= 0"),
    ("balance.window", 0, r"window \(Q\) must be an integer >= 1"),
    ("balance.method", "greedy", "Unknown method 'greedy'"),
    ("balance.update_mode", "everything", "Unknown update mode 'everything'"),
    ("optimizer.name", "lion", "Unknown optimizer.name 'lion'"),
    ("schedule.name", "cosine", "Unknown schedule.name 'cosine'"),
])
def test_bad_config_values_are_refused_before_writing(field, value, message, data_dir, tmp_path):
  config = tiny_config("guided", data_dir)
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, tmp_path)
  assert not list(tmp_path.iterdir())


def test_metric_log_drops_a_row_cut_by_a_kill_and_rows_past_the_checkpoint(tmp_path):
  path = tmp_path / "steps.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
  log = workdir.MetricLog(path, resume_step=2)
  assert log.rows == [{"step": 1}, {"step": 2}]
  log.append([{"step": 3, "loss": 0.5}])
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3, "loss": 0.5}\n'
