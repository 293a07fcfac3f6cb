"""The study's fault matrix: what users do to a study (two at once, signals, kills, bad
arguments, damaged summaries, a folder it cannot write), each case checking the exit
status, the last console line, that no finished run is reported failed or counted twice,
that study.json is written, and that no run outlives the study."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
from ml_collections import config_dict
from run_helpers import CONFIG, restore_latest, run_module, start_module, step_rows, tiny_flags

from experiments import colored_mnist
from gml_jax.runner import study


def _args(workdir, data_dir, *extra, methods="vanilla", seeds="0", **overrides):
  fields = tiny_flags(data_dir, **overrides) if data_dir else []
  return [f"--config={CONFIG}", f"--methods={methods}", f"--seeds={seeds}",
          f"--workdir={workdir}", *fields, *extra]


def _study(*args, timeout=600):
  return run_module("gml_jax.runner.study", *args, timeout=timeout)


def _start_study(*args):
  return start_module("gml_jax.runner.study", *args)


def _last_line(result) -> str:
  return (result.stdout + result.stderr).strip().splitlines()[-1] if isinstance(
      result, subprocess.CompletedProcess) else result


def _runs_of(workdir: pathlib.Path) -> list[int]:
  """Processes (pids) whose command line names ``workdir``: a study's runs."""
  pids = []
  for entry in pathlib.Path("/proc").iterdir():
    try:
      cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
      continue
    if entry.name.isdigit() and "gml_jax.runner.main" in cmdline and str(workdir) in cmdline:
      pids.append(int(entry.name))
  return pids


def _wait_for(condition, timeout=120, proc=None):
  deadline = time.time() + timeout
  while not condition():
    assert proc is None or proc.poll() is None, proc.communicate()
    assert time.time() < deadline, "timed out"
    time.sleep(0.1)


def _steps_logged(workdir: pathlib.Path) -> int:
  path = workdir / "metrics" / "steps.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


# --------------------------------------------------------------------------------------
# 1, 2: one study per directory; signals and kills


def test_a_second_study_on_the_same_directory_is_refused_at_once(data_dir, tmp_path):
  first = _start_study(*_args(tmp_path, data_dir, num_epochs=4, log_every_steps=1))
  _wait_for(lambda: _steps_logged(tmp_path / "vanilla" / "seed_0") >= 1, proc=first)
  second = _study(*_args(tmp_path, data_dir, num_epochs=4, log_every_steps=1))
  assert second.returncode == 1
  assert _last_line(second).startswith(
      f"Error: Workdir {tmp_path} is in use by another study (host ")
  assert f"pid {first.pid}," in _last_line(second)
  assert "started" not in second.stdout
  assert not (tmp_path / "study_error.log").exists()  # nothing written into the other's
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, out[-2000:] + err[-2000:]
  assert "FAILED" not in out and out.count("finished vanilla seed 0") == 1
  saved = json.loads((tmp_path / "study.json").read_text())
  assert saved["groups"][0]["metrics"]["test_accuracy"]["n"] == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_runs_at_a_checkpoint_and_the_study_resumes(sig, data_dir, tmp_path):
  args = _args(tmp_path, data_dir, seeds="0-1", num_epochs=4, log_every_steps=1)
  running = _start_study(*args)
  run_dir = tmp_path / "vanilla" / "seed_0"
  _wait_for(lambda: _steps_logged(run_dir) >= 2, proc=running)
  running.send_signal(sig)
  out, err = running.communicate(timeout=120)
  assert running.returncode == 128 + sig
  last = (out + err).strip().splitlines()[-1]
  assert last.startswith(f"Stopped by {signal.Signals(sig).name}: 1 run(s) stopped at their "
                         "checkpoints (vanilla seed 0), 1 not started.")
  assert "FAILED" not in out and "stopped vanilla seed 0" in out
  assert not _runs_of(tmp_path)
  assert (run_dir / "checkpoints" / "latest").exists()
  saved = restore_latest(run_dir)[0]  # the checkpoint it reports is the one it wrote
  assert f"stopped vanilla seed 0 at its checkpoint of step {saved}; it resumes" in out
  assert json.loads((tmp_path / "study.json").read_text())["groups"] == []

  again = _study(*args)
  assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
  assert "Resuming" in (run_dir / "run.log").read_text()
  assert again.stdout.count("finished") == 2 and "FAILED" not in again.stdout
  steps = [row["step"] for row in step_rows(run_dir)]
  assert steps == list(range(1, 21))  # every step once
  assert json.loads((tmp_path / "study.json").read_text())["groups"][0]["seeds"] == [0, 1]


def test_a_killed_study_takes_its_runs_with_it_and_is_taken_over(data_dir, tmp_path):
  args = _args(tmp_path, data_dir, num_epochs=4, log_every_steps=1)
  killed = _start_study(*args)
  run_dir = tmp_path / "vanilla" / "seed_0"
  _wait_for(lambda: _steps_logged(run_dir) >= 2, proc=killed)
  assert _runs_of(tmp_path)
  killed.kill()
  killed.communicate(timeout=60)
  _wait_for(lambda: not _runs_of(tmp_path), timeout=10)  # the run died with the study

  again = _study(*args)
  assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
  assert "Taking over the lock of a study that ended without releasing it" in again.stdout
  assert "FAILED" not in again.stdout and "in use" not in again.stdout
  assert again.stdout.count("finished vanilla seed 0") == 1


# --------------------------------------------------------------------------------------
# 3, 5: arguments, all checked before any run


@pytest.mark.parametrize("flag, message", [
    ("--parallel=0", "Error: --parallel=0: expected an integer >= 1."),
    ("--seeds=-1", "Error: --seeds=-1: '-1' is not a seed or a range;"),
    ("--seeds=3-1", "Error: --seeds=3-1: the range 3-1 goes down;"),
    ("--seeds=", "Error: --seeds=: '' is not a seed or a range;"),
    ("--seeds=0,0", "Error: --seeds=0,0: seeds [0] are listed more than once"),
    ("--methods=vanilla,vanilla", "Error: --methods=vanilla,vanilla: a method is listed twice."),
    ("--grid=balance.guided.window=abc", "Error: --grid balance.guided.window=abc: 'abc' is not a "
                                         "value of balance.guided.window"),
    ("--grid=batch_size=32,0", "Error: The run batch_size=0, vanilla would fail: "
                               "config.batch_size=0 is invalid: expected an integer >= 1."),
    ("--grid=balance.random.window=1,2", "Error: --grid balance.random.window=1,2: no run of "
                                         "--methods=vanilla reads it: balance.random.* reaches "
                                         "the runs of method 'random' only."),
    ("--grid=data.modalities=(0,),(7,)", "Error: The run data.modalities=(0,), vanilla would fail"),
])
def test_bad_arguments_are_refused_in_one_line_before_any_run(flag, message, tmp_path):
  result = _study(*_args(tmp_path / "study", None), flag)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [_last_line(result)]  # one line, no traceback
  assert _last_line(result).startswith(message), _last_line(result)
  assert not (tmp_path / "study").exists()


def test_seeds_and_grid_values_parse_as_written():
  assert study.parse_seeds("0-1,3") == [0, 1, 3]
  assert study.parse_seeds("7") == [7]
  assert study.split_values("(0,),(1,)") == ["(0,)", "(1,)"]
  assert study.split_values("0.1,'a,b',[1, 2]") == ["0.1", "'a,b'", "[1, 2]"]
  config = colored_mnist.get_config("unimodal_0")
  points = study.parse_grid(["data.modalities=(0,),(1,)", "balance.guided.alpha=0.1,1e-3"],
                            config)
  assert points == [(("data.modalities", "(0,)"), ("balance.guided.alpha", "0.1")),
                    (("data.modalities", "(0,)"), ("balance.guided.alpha", "1e-3")),
                    (("data.modalities", "(1,)"), ("balance.guided.alpha", "0.1")),
                    (("data.modalities", "(1,)"), ("balance.guided.alpha", "1e-3"))]
  assert study.parse_value("(0, 1)", (0,)) == (0, 1)
  assert study.parse_value("True", False) is True and study.parse_value("2", 1.0) == 2.0
  with pytest.raises(ValueError, match="expected a tuple"):
    study.parse_value("3", (0,))
  assert isinstance(config, config_dict.ConfigDict)


def test_a_tuple_grid_runs_one_run_per_tuple(data_dir, tmp_path):
  result = _study(*_args(tmp_path, data_dir, "--grid=data.modalities=(0,),(1,)",
                         methods="unimodal_0", num_epochs=1))
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert result.stdout.count("finished") == 2
  for modalities in ((0,), (1,)):
    config = json.loads((tmp_path / f"data.modalities={modalities}".replace(" ", "") /
                         "unimodal_0" / "seed_0" / "config.json").read_text())
    assert tuple(config["data"]["modalities"]) == modalities


# --------------------------------------------------------------------------------------
# 4: summaries that do not read, a run folder deleted mid-study


def _finished(workdir: pathlib.Path, seed: int, text: str) -> pathlib.Path:
  path = workdir / "vanilla" / f"seed_{seed}" / "summary.json"
  path.parent.mkdir(parents=True)
  path.write_text(text)
  return path


def test_unreadable_summaries_are_named_and_left_out(tmp_path):
  truncated = _finished(tmp_path, 0, '{"test_accuracy": 0.5, "test_bia')
  a_list = _finished(tmp_path, 1, "[1, 2]")
  empty = _finished(tmp_path, 2, "{}")
  _finished(tmp_path, 3, json.dumps({"test_accuracy": 0.75}))
  result = _study(*_args(tmp_path, None, seeds="0-3"))
  assert result.returncode == 1
  assert result.stdout.count("skipped") == 4 and "started" not in result.stdout
  column = truncated.read_text().index('"test_bia') + 1  # where the cut string starts
  assert (f"LEFT OUT vanilla seed 0: {truncated} is not valid JSON (Unterminated string "
          f"starting at line 1 column {column}); it was cut or edited.") in result.stdout
  assert f"LEFT OUT vanilla seed 1: {a_list} is not a run summary" in result.stdout
  assert f"LEFT OUT vanilla seed 2: {empty} is not a run summary" in result.stdout
  assert _last_line(result).startswith("Error: 3 of 4 runs left out of the study: vanilla seed 0")
  saved = json.loads((tmp_path / "study.json").read_text())
  accuracy = saved["groups"][0]["metrics"]["test_accuracy"]
  assert (accuracy["n"], accuracy["mean"]) == (1, 0.75)
  assert [r["status"] for r in saved["runs"]] == ["unreadable"] * 3 + ["skipped"]


def test_a_run_folder_deleted_mid_study_is_left_out_and_the_rest_aggregated(data_dir, tmp_path):
  gone = _finished(tmp_path, 0, json.dumps({"test_accuracy": 0.5})).parent
  running = _start_study(*_args(tmp_path, data_dir, seeds="0-1"))
  _wait_for(lambda: (tmp_path / "vanilla" / "seed_1" / "run.log").exists(), proc=running)
  for f in gone.iterdir():
    f.unlink()
  gone.rmdir()
  out, err = running.communicate(timeout=600)
  assert running.returncode == 1
  assert f"LEFT OUT vanilla seed 0: {gone / 'summary.json'} is missing" in out
  assert "finished vanilla seed 1" in out and "FAILED" not in out
  assert (out + err).strip().splitlines()[-1].startswith("Error: 1 of 2 runs left out")
  saved = json.loads((tmp_path / "study.json").read_text())
  assert saved["groups"][0]["seeds"] == [1]


# A run that acts as the runner's (a fake, without JAX): one whose folder is deleted under it
# (it fails), one busy in a long save that does not stop at SIGTERM (its newest complete
# checkpoint is of step 20, the save of step 31 is unfinished).
_FAKE_RUN = """import pathlib, shutil, signal, sys, time
workdir = pathlib.Path(sys.argv[1])
if workdir.name == "seed_1":
  shutil.rmtree(workdir)
  sys.exit(1)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for name in ("5", "20", "31.orbax-checkpoint-tmp-1"):
  (workdir / "checkpoints" / "latest" / name).mkdir(parents=True)
(workdir / "ready").touch()
time.sleep(60)
"""


def test_after_two_signals_the_study_reports_the_killed_run_and_its_last_checkpoint(
    tmp_path, capsys):
  runs = [study.Run("vanilla", s, (), tmp_path / "vanilla" / f"seed_{s}") for s in (0, 1)]
  stop = study.StopRequest()

  def signals():  # the user's Ctrl-C twice, once the busy run is saving
    _wait_for(lambda: (runs[0].workdir / "ready").exists() and not runs[1].workdir.exists())
    stop.signum, stop.count = signal.SIGINT, 1
    # the second only once seed 1 has failed on its own (under load it may not have yet)
    _wait_for(lambda: runs[1].status == "failed")
    stop.count = 2

  thread = threading.Thread(target=signals)
  thread.start()
  study.execute(runs, lambda run: [sys.executable, "-c", _FAKE_RUN, str(run.workdir)], 2, stop)
  thread.join()
  out = capsys.readouterr().out
  assert "[1/2] killed vanilla seed 0 by SIGKILL; last checkpoint: step 20; it resumes from " \
         "there when the study runs again" in out
  assert (runs[0].status, runs[1].status) == ("killed", "failed")
  assert study.stop_report(runs, signal.SIGINT) == (
      "Stopped by SIGINT: 0 run(s) stopped at their checkpoints (none), 1 killed (vanilla "
      "seed 0, last checkpoint: step 20), 0 not started. Run the same command to resume.")
  # The run whose folder went is not sent to a log that went with it.
  assert runs[1].problem == (f"exit 1; its folder {runs[1].workdir} was deleted while it ran, "
                             "its log with it")
  assert f"[2/2] FAILED vanilla seed 1 ({runs[1].problem})" in out


# --------------------------------------------------------------------------------------
# 6: a directory it cannot create


def test_a_study_directory_that_cannot_be_made_ends_in_one_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  result = _study(*_args(blocker / "study", None))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [_last_line(result)]  # no traceback
  assert _last_line(result).startswith("Error: [Errno 20] Not a directory:")
  assert os.listdir(tmp_path) == ["a_file"]
