"""The fault matrix of real training processes: stopped by SIGTERM or killed by SIGKILL
(also mid-save, also one process of two), two runs on one workdir, a killed run's lock, a
workdir removed or damaged, symbolic links, and every failure's one last line. Each case
checks the exit code, the message, that nothing that should stay is changed, and (for
resumes) that the results equal the uninterrupted run's. The in-process checks of the same
modules live in test_build.py, test_checkpoints.py, test_dataset.py, test_logs.py and
test_trainer.py."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from run_helpers import (
  MAIN,
  ROOT,
  assert_states_close,
  cli_args,
  cli_env,
  epoch_rows,
  free_port,
  restore_latest,
  run_cli,
  start_module,
  step_rows,
)

from gml_jax.runner import names

# 4 epochs of 5 steps, metrics fetched every step so that a signal is seen at once.
RUN = dict(num_epochs=4, log_every_steps=1)


def _start(workdir, data_dir, **overrides):
  return start_module(MAIN, *cli_args("random", workdir, data_dir, **(RUN | overrides)))


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


# The tests that compare against the reference run go to one xdist worker (make test's
# --dist loadgroup), which makes that run once.
ON_THE_REFERENCE_WORKER = pytest.mark.xdist_group("faults_reference")


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted run: (steps.jsonl rows, final state)."""
  workdir = tmp_path_factory.mktemp("reference")
  _finish(workdir, data_dir)
  return step_rows(workdir), restore_latest(workdir)


def _same_trajectory(workdir, reference, rtol=1e-5, atol=1e-6):
  rows, (ref_step, ref_state) = reference
  resumed = step_rows(workdir)
  assert [r["step"] for r in resumed] == list(range(1, 21))
  assert [r["target"] for r in resumed] == [r["target"] for r in rows]
  np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in rows], rtol=rtol)
  step, state = restore_latest(workdir)
  assert step == ref_step == 20
  assert_states_close(state, ref_state, rtol=rtol, atol=atol)


@ON_THE_REFERENCE_WORKER
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


@ON_THE_REFERENCE_WORKER
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


# --------------------------------------------------------------------------------------
# The workdir lock, and a finished workdir run again


def _snapshot(directory):
  return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(directory.rglob("*")) if p.is_file()}


def test_second_run_on_a_workdir_in_use_stops_at_once(data_dir, tmp_path):
  first = _start(tmp_path, data_dir)
  _wait_for_steps(tmp_path, 2, first)
  second = run_cli(*cli_args("random", tmp_path, data_dir, **RUN))
  assert second.returncode == 1
  last = second.stderr.strip().splitlines()[-1]
  assert last.startswith(f"Error: Workdir {tmp_path} is in use by another run (host ")
  assert f"pid {first.pid}, started " in last
  assert "(details:" not in last  # nothing written into the other run's workdir
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  assert not (tmp_path / "error.log").exists()  # the finished run does not look failed
  assert [r["step"] for r in step_rows(tmp_path)] == list(range(1, 21))  # each step once
  epochs = epoch_rows(tmp_path)
  assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]

  before = _snapshot(tmp_path)
  again = _finish(tmp_path, data_dir)  # finished: re-prints the summary, changes nothing
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert f"test accuracy             {summary['test_accuracy']:.4f}" in again
  assert _snapshot(tmp_path) == before

  # Without its config.json, the finished run is shown only to the config whose digest its
  # checkpoint holds; another config is told so in one line, and nothing is written.
  (tmp_path / "config.json").unlink()
  before = _snapshot(tmp_path)
  other = run_cli(*cli_args("random", tmp_path, data_dir, **(RUN | dict(batch_size=64,
                                                                         num_epochs=2))))
  assert other.returncode == 1
  assert _last_console_line(other) == (
      f"Error: Workdir {tmp_path} holds a finished run of another config or on other data "
      f"(its config.json is missing; the config digest saved with "
      f"{tmp_path / 'checkpoints' / 'latest' / '20'} differs from this config's): its summary "
      "is not shown as this config's result. Use a new --workdir, or the config that made it.")
  assert "test accuracy" not in other.stdout and _snapshot(tmp_path) == before
  confirmed = _finish(tmp_path, data_dir)  # the same config: its digest confirms it
  assert f"test accuracy             {summary['test_accuracy']:.4f}" in confirmed
  shutil.rmtree(tmp_path / "checkpoints")
  before = _snapshot(tmp_path)
  unconfirmed = run_cli(*cli_args("random", tmp_path, data_dir, **RUN))
  assert unconfirmed.returncode == 1
  assert _last_console_line(unconfirmed) == (
      f"Error: Workdir {tmp_path} holds a finished run whose config cannot be confirmed (its "
      "config.json is missing, and no checkpoint holds its config's digest): its summary is "
      "not shown as this config's result. Restore its config.json, or use a new --workdir.")
  assert "test accuracy" not in unconfirmed.stdout and _snapshot(tmp_path) == before


@ON_THE_REFERENCE_WORKER
def test_lock_of_a_killed_run_is_taken_over(data_dir, reference, tmp_path):
  killed = _start(tmp_path, data_dir)
  _wait_for_steps(tmp_path, 3, killed)
  killed.kill()
  killed.wait()
  assert f'"pid": {killed.pid}' in (tmp_path / "lock.json").read_text()  # left behind
  out = _finish(tmp_path, data_dir)
  assert "Taking over the lock of a run that ended without releasing it (host " in out
  assert f"pid {killed.pid}" in out
  _same_trajectory(tmp_path, reference)


# --------------------------------------------------------------------------------------
# A failed run ends with its reason, not with library dumps


def test_foreign_checkpoint_error_is_the_last_line(data_dir, tmp_path):
  small = run_cli(*cli_args("guided", tmp_path / "small", data_dir, "--stop_after_steps=2"))
  assert small.returncode == 0, small.stderr[-3000:]
  shutil.copytree(tmp_path / "small" / "checkpoints", tmp_path / "wide" / "checkpoints")
  wide = run_cli(*cli_args("guided", tmp_path / "wide", data_dir, model__small_cnn__width=8))
  assert wide.returncode == 1
  lines = wide.stderr.strip().splitlines()
  assert lines[-1].startswith(f"Error: Checkpoint {tmp_path / 'wide' / 'checkpoints'}")
  assert "does not fit this model and optimizer (" in lines[-1]
  assert "arrays differ in shape, e.g. " in lines[-1] and "this model (" in lines[-1]
  assert f"(details: {tmp_path / 'wide' / 'error.log'})" in lines[-1]
  assert "Traceback" in (tmp_path / "wide" / "error.log").read_text()
  assert "Event loop is closed" not in wide.stderr and "Traceback" not in wide.stderr
  assert len(wide.stderr) < 5000  # a progress bar and the reason, no array dumps
  assert restore_latest(tmp_path / "wide")[0] == 2  # the foreign checkpoint is untouched


def test_corrupt_dataset_error_is_the_last_line(data_dir, tmp_path):
  copy = shutil.copytree(data_dir, tmp_path / "tfds")
  (train_file,) = copy.glob("colored_mnist/*/*/*-train.array_record*")
  train_file.write_bytes(train_file.read_bytes()[:1000])
  result = run_cli(*cli_args("guided", tmp_path / "run", copy))
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: Cannot read example") and "corrupt or truncated" in last
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------
# One process of a two-process job killed


def _two_processes(workdir, data_dir, port, *extra):
  return [start_module(MAIN, *cli_args(
      "random", workdir, data_dir, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2", f"--process_id={i}", *extra, **(RUN | {"checkpoint_every_steps": 2})),
      devices=2) for i in range(2)]


@ON_THE_REFERENCE_WORKER
def test_one_process_of_two_killed_then_the_job_resumes(data_dir, reference, tmp_path):
  # The survivor notices its lost peer after 5 s without a heartbeat (instead of 100 s).
  procs = _two_processes(tmp_path, data_dir, free_port(), "--heartbeat_timeout_seconds=5")
  _wait_for_steps(tmp_path, 6, procs[0])
  procs[1].kill()
  try:  # the survivor fails (or hangs) on its lost peer: it is ended after a while
    procs[0].wait(timeout=90)
  except subprocess.TimeoutExpired:
    procs[0].kill()
  procs[1].wait()
  saved, _ = restore_latest(tmp_path)
  assert 0 < saved < 20
  procs = _two_processes(tmp_path, data_dir, free_port())
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  # Two processes against the one-process reference: as close as tests/test_distributed.py.
  _same_trajectory(tmp_path, reference, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Every failure ends in one line that names the file; a workdir cannot be confused or
# redirected


def _cli(workdir, data_dir, *extra, method="guided", **overrides):
  return run_cli(*cli_args(method, workdir, data_dir, *extra, **overrides))


def _last_console_line(result) -> str:
  """The last line as a terminal shows it: progress bars redraw with \\r, so an error
  printed right after a bar would share its line."""
  return (result.stdout + result.stderr).rstrip("\n").split("\n")[-1]


def test_a_diverging_run_ends_with_the_error_on_its_own_line(data_dir, tmp_path):
  (tmp_path / "error.log").mkdir(parents=True)  # a log that cannot be written
  result = _cli(tmp_path, data_dir, optimizer__learning_rate=1e6, optimizer__momentum=0.0,
                log_every_steps=1)
  assert result.returncode == 1
  last = _last_console_line(result)
  assert last.startswith("Error: The training loss is"), last
  assert last.endswith(f"(the details could not be written to {tmp_path / 'error.log'}: "
                       f"[Errno 21] Is a directory: '{tmp_path / 'error.log'}')")
  assert "Traceback" not in result.stderr


def test_a_workdir_removed_mid_training_ends_in_one_line(data_dir, tmp_path):
  workdir = tmp_path / "run"
  proc = _start(workdir, data_dir)
  _wait_for_steps(workdir, 2, proc)
  for _ in range(100):  # the run writes while it is removed, as under a user's rm -rf
    shutil.rmtree(workdir, ignore_errors=True)
    if not workdir.exists():
      break
  assert not workdir.exists()
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 1
  last = (out + err).rstrip("\n").split("\n")[-1]
  assert last.startswith("Error: [Errno 2] No such file or directory: "), last
  assert str(workdir) in last and "Traceback" not in err


def test_a_checkpoint_is_refused_to_another_config_even_without_config_json(data_dir,
                                                                             tmp_path):
  first = _cli(tmp_path, data_dir, "--stop_after_steps=3")
  assert first.returncode == 0, first.stderr[-2000:]
  (tmp_path / "config.json").unlink()
  other = _cli(tmp_path, data_dir, optimizer__learning_rate=0.5, batch_size=64)
  assert other.returncode == 1
  last = _last_console_line(other)
  assert last.startswith(f"Error: Checkpoint {tmp_path / 'checkpoints' / 'latest' / '3'} was "
                         "saved by a run of another config"), last
  assert not (tmp_path / "config.json").exists()  # nothing written for the refused config
  assert not (tmp_path / "summary.json").exists()
  same = _cli(tmp_path, data_dir)
  assert same.returncode == 0, same.stderr[-2000:]
  assert "Resuming" in same.stdout and (tmp_path / "config.json").exists()


def test_symbolic_links_in_a_workdir_are_not_followed(data_dir, tmp_path):
  outside = tmp_path / "outside.txt"
  outside.write_text("keep me")
  locked = tmp_path / "locked"
  locked.mkdir()
  (locked / "lock.json").symlink_to(outside)
  refused = _cli(locked, data_dir)
  assert refused.returncode == 1
  assert _last_console_line(refused).startswith(
      f"Error: {locked / 'lock.json'} is a symbolic link (to {outside}); the runner does not "
      "write through links.")
  assert outside.read_text() == "keep me"

  logged = tmp_path / "logged"
  (logged / "metrics").mkdir(parents=True)
  (logged / "metrics" / "steps.jsonl.tmp").symlink_to(outside)
  run = _cli(logged, data_dir, "--stop_after_steps=2")
  assert run.returncode == 0, run.stderr[-2000:]
  assert outside.read_text() == "keep me"
  assert [r["step"] for r in step_rows(logged)] == [1, 2]

  (logged / "metrics" / "epochs.jsonl").unlink()
  (logged / "metrics" / "epochs.jsonl").symlink_to(outside)
  refused = _cli(logged, data_dir)
  assert refused.returncode == 1 and "epochs.jsonl is a symbolic link" in refused.stderr
  assert outside.read_text() == "keep me"


def test_linked_folders_of_a_workdir_are_not_written_through(data_dir, tmp_path):
  for folder in ("metrics", "checkpoints", "plots", "tensorboard"):
    outside = tmp_path / f"outside_{folder}"
    outside.mkdir()
    workdir = tmp_path / folder / "run"
    workdir.mkdir(parents=True)
    (workdir / folder).symlink_to(outside, target_is_directory=True)
    refused = _cli(workdir, data_dir, "--stop_after_steps=1")
    assert refused.returncode == 1, folder
    assert _last_console_line(refused) == (
        f"Error: {workdir / folder} is a symbolic link (to {outside}); the runner does not "
        f"write through links. Remove it (or use a new --workdir). (details: "
        f"{workdir / 'error.log'})"), folder
    assert list(outside.iterdir()) == [], folder


@pytest.mark.parametrize("args, message", [
    (["--config.balance.ogm_ge.alhpa=0.5"], 'Error: --config.balance.ogm_ge.alhpa: unknown config '
     'field. \'alhpa\' Did you mean "alpha" instead of "alhpa"?'),
    (["--config.balance.ogm_alpha=0.5"], "Error: --config.balance.ogm_alpha: the old layout: a "
     "method's options now live under its name; use --config.balance.ogm_ge.alpha."),
    (["--config.data.hflip=maybe"], "Error: --config.data.hflip=maybe: expected True or False."),
    (["--config.data.modalities=(True,False)"], "Error: config.data.modalities=(True, False) is "
     "invalid: expected distinct integer indices of colored_mnist's 2 modalities"),
])
def test_config_errors_are_one_line(args, message, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "gml_jax.runner.main", f"--config={ROOT}/experiments/"
       "colored_mnist.py:guided", f"--workdir={tmp_path / 'run'}", *args], cwd=ROOT,
      env=cli_env(1), capture_output=True, text=True, timeout=300)
  assert result.returncode in (1, 2)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def test_an_unknown_variant_is_one_line_listing_the_variants(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "gml_jax.runner.main",
       f"--config={ROOT}/experiments/colored_mnist.py:guidedd", f"--workdir={tmp_path}"],
      cwd=ROOT, env=cli_env(1), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  # the variants are the registered methods' (gml_jax/runner/methods/), in their order
  assert {"vanilla", "random", "guided", "ogm_ge", "ogm_ge_joint", "fixed_0", "fixed_1",
          "random_matched", "unimodal_0", "unimodal_1", "late_fusion",
          "late_fusion_joint"} <= set(names.VARIANTS)
  assert result.stderr.strip().splitlines() == [
      f"Error: Unknown variant 'guidedd' of colored_mnist; expected one of {names.VARIANTS}."]


def test_damaged_files_of_a_workdir_are_named(data_dir, tmp_path):
  first = _cli(tmp_path, data_dir, "--stop_after_steps=2")
  assert first.returncode == 0, first.stderr[-2000:]
  config_json = tmp_path / "config.json"
  saved = config_json.read_text()
  # A crafted config.json: a huge field is named, cut to a sensible length.
  config_json.write_text(json.dumps(json.loads(saved) | {"x" * 1_000_000: 1}))
  crafted = _cli(tmp_path, data_dir)
  assert crafted.returncode == 1 and "holds a run of another config" in crafted.stderr
  assert len(_last_console_line(crafted)) < 1000
  config_json.write_text(saved[:40])  # cut short
  cut = _cli(tmp_path, data_dir)
  assert cut.returncode == 1
  assert _last_console_line(cut).startswith(f"Error: {config_json} is not valid JSON (")
  config_json.write_text(saved)
  checkpoint = tmp_path / "checkpoints" / "latest" / "2"
  arrays = {p: p.read_bytes() for p in checkpoint.glob("state/ocdbt.process_0/d/*")}
  for path, data in arrays.items():
    path.write_bytes(data[:10])  # every array file cut short
  cut_arrays = _cli(tmp_path, data_dir)
  assert cut_arrays.returncode == 1
  last = _last_console_line(cut_arrays)
  assert last.startswith(f"Error: Checkpoint {checkpoint} is damaged (it cannot be read back: "
                         "OUT_OF_RANGE: Error reading "), last
  assert "<bound method" not in last and "pybind11" not in last
  for path, data in arrays.items():
    path.write_bytes(data)
  manifest = checkpoint / "state" / "manifest.ocdbt"
  manifest.write_bytes(manifest.read_bytes()[:20])  # truncated
  truncated = _cli(tmp_path, data_dir)
  assert truncated.returncode == 1
  assert _last_console_line(truncated).startswith(
      f"Error: Checkpoint {checkpoint} is damaged ({checkpoint / 'state' / '_METADATA'} lists "
      "119 arrays, ")
  (checkpoint / "state" / "_METADATA").unlink()
  damaged = _cli(tmp_path, data_dir)
  assert damaged.returncode == 1
  last = _last_console_line(damaged)
  assert last.startswith(f"Error: Checkpoint {checkpoint} is damaged "
                         f"({checkpoint / 'state' / '_METADATA'} is missing or empty)"), last
  assert f"delete {checkpoint} to resume from an older checkpoint" in last
