"""The training loop's parts (gml_jax/runner/loop.py) against hand-written cases, and the loop
as a whole against the outputs of the loop it replaced."""

import json

import numpy as np
import pytest
from run_helpers import CONFIG, DUMMY, ROOT, cli_env, run_cli

from gml_jax.runner import loop, names
from gml_jax.runner.checkpoints import Progress
from gml_jax.runner.logs import EpochSums, epoch_row

# (step, unfetched steps, steps per epoch, log every, checkpoint every, stop after)
#   -> (fetch, epoch end, checkpoint, stop), written out by hand.
DUE_CASES = [
    ((3, 3, 10, 5, 0, None), (False, False, False, False)),  # nothing due
    ((6, 6, 10, 5, 0, None), (True, False, False, False)),  # more than log_every waiting
    ((5, 5, 10, 5, 0, None), (False, False, False, False)),  # exactly log_every: not yet
    ((10, 4, 10, 5, 0, None), (True, True, True, False)),  # epoch end: checkpoint too
    ((20, 1, 10, 50, 0, None), (True, True, True, False)),  # epoch end whatever the log
    ((8, 2, 10, 5, 4, None), (True, False, True, False)),  # checkpoint_every_steps
    ((6, 2, 10, 5, 4, None), (False, False, False, False)),
    ((7, 1, 10, 5, 0, 7), (True, False, False, True)),  # --stop_after_steps
    ((9, 1, 10, 5, 0, 7), (True, False, False, True)),  # a call of k crossed it
    ((12, 8, 4, 5, 3, 12), (True, True, True, True)),  # everything at once
]


@pytest.mark.parametrize("case,expected", DUE_CASES)
def test_what_is_due_at_a_step(case, expected):
  step, unfetched, spe, log_every, every, stop = case
  due = loop.due_at(step, unfetched, steps_per_epoch=spe, log_every=log_every,
                    checkpoint_every=every, stop_after=stop)
  assert (due.fetch, due.epoch_end, due.checkpoint, due.stop) == expected
  assert due.sync == (due.epoch_end or due.checkpoint or due.stop)


def test_training_clock_leaves_out_its_pauses(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
  clock = loop.TrainClock()
  clock.start(seconds_before=7.0)  # a resumed run's time so far
  now[0] += 3  # training
  with clock.section("step calls"):
    now[0] += 2
  with clock.section("evaluation"):
    now[0] += 10
    assert clock.seconds() == 7 + 5  # a pause in progress counts up to its start
    with clock.section("checkpoint saves"):  # nested in a pause: counted once
      now[0] += 4
  now[0] += 1
  with clock.section("checkpoint saves"):
    now[0] += 6
  assert clock.seconds() == 7 + 3 + 2 + 1
  assert clock.sections == {"step calls": 2, "evaluation": 14, "checkpoint saves": 10}
  waits = list(clock.timed("waiting for batches", iter([1, 2])))
  assert waits == [1, 2] and clock.sections["waiting for batches"] == 0


def test_metric_fetcher_leaves_the_last_call_for_the_next_log():
  def metrics(loss):
    return {"loss": np.float32(loss), "accuracy": np.float32(0.5), "target": np.int32(-1),
            "branch_accuracy": np.array([0.25, 0.75], np.float32),
            "branch_loss": np.array([1.0, 2.0], np.float32)}

  fetcher = loop.MetricFetcher(modalities=(0, 1))
  fetcher.add(metrics(1.0), 1)
  fetcher.add({k: np.stack([v, v]) for k, v in metrics(2.0).items()}, 2)  # a 2-step call
  fetcher.add(metrics(3.0), 1)
  assert fetcher.unfetched_steps == 4
  rows = fetcher.fetch(step=4, sync=False)  # the last call stays on the device
  assert [(r[names.STEP], r[names.LOSS]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 2.0)]
  assert rows[0][names.branch_accuracy(1)] == 0.75 and fetcher.unfetched_steps == 1
  assert fetcher.fetch(step=4, sync=False) == []  # one call: left for the next fetch
  assert [r[names.STEP] for r in fetcher.fetch(step=4, sync=True)] == [4]
  assert fetcher.unfetched_steps == 0


def test_epoch_means_from_running_sums_survive_a_checkpoint():
  rng = np.random.default_rng(0)
  rows = [{names.STEP: i + 1, names.LOSS: float(np.float32(rng.uniform(0, 3))),
           names.ACCURACY: float(np.float32(rng.integers(0, 33) / 32)), names.TARGET: -1,
           names.D_SPEED: float(i), names.branch_accuracy(1): float(np.float32(i / 7)),
           names.branch_loss(1): 9.0, names.speed(1): float(-i)} for i in range(7)]
  sums = EpochSums()
  sums.add(rows[:3], modalities=(1,))
  # Saved with the progress of a mid-epoch checkpoint, restored, continued.
  saved = json.loads(json.dumps(Progress(epoch_sums=sums).to_json()))
  progress = Progress.from_json(saved)
  progress.epoch_sums.add(rows[3:], modalities=(1,))
  row = epoch_row(2, 7, progress.epoch_sums, {names.ACCURACY: 0.5})
  for key in (names.LOSS, names.ACCURACY, names.branch_accuracy(1)):
    assert row[names.train(key)] == np.mean([r[key] for r in rows])
  assert names.train(names.branch_loss(1)) not in row  # losses per branch: not averaged
  assert (row[names.D_SPEED], row[names.speed(1)]) == (6.0, -6.0)  # the last step's
  assert row[names.val(names.ACCURACY)] == 0.5 and row[names.EPOCH] == 2


# --------------------------------------------------------------------------------------
# The loop as a whole

GOLDEN = ROOT / "tests" / "golden"
TIMINGS = {names.TRAIN_SECONDS, names.SAMPLES_PER_S, names.COMPILE_SECONDS, "data"}


def _close(new, old):
  """Equal keys, ints and strings; floats to 1e-5 (another CPU may round differently)."""
  if isinstance(old, dict):
    return new.keys() == old.keys() and all(_close(new[k], old[k]) for k in old)
  if isinstance(old, list):
    return len(new) == len(old) and all(_close(a, b) for a, b in zip(new, old))
  if isinstance(old, float):
    return new == pytest.approx(old, rel=1e-5, abs=1e-7)
  return new == old


@pytest.mark.parametrize("method", ["guided", "ogm_ge"])
def test_a_run_writes_what_the_loop_it_replaced_wrote(method, data_dir, tmp_path):
  """tests/golden/<method>: steps.jsonl, epochs.jsonl and summary.json of this run, written
  by the loop before the loop of gml_jax/runner/loop.py (commit ebe2e8b). Mid-epoch
  checkpoints (every 4 steps) and logs every 3 steps exercise the fetch lag and the epoch
  sums; every key written is one of gml_jax/runner/names.py."""
  workdir = tmp_path / "run"
  flags = {"data.data_dir": data_dir, "data.manual_dir": DUMMY, "model.small_cnn.width": 4,
           "batch_size": 32, "eval_batch_size": 64, "num_epochs": 2, "log_every_steps": 3,
           "checkpoint_every_steps": 4}
  # One device and `make train`'s XLA flag, compiled with the tests' quick flags and cache:
  # the golden files were written fully optimised, and the values still agree to 1e-5.
  ynn = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
  result = run_cli(f"--config={CONFIG}:{method}", f"--workdir={workdir}",
                   *(f"--config.{k}={v}" for k, v in flags.items()),
                   env={"XLA_FLAGS": f"{cli_env(1)['XLA_FLAGS']} {ynn}"})
  assert result.returncode == 0, result.stderr[-3000:]
  read_rows = lambda p: [json.loads(line) for line in p.read_text().splitlines()]
  steps = read_rows(workdir / "metrics" / "steps.jsonl")
  epochs = read_rows(workdir / "metrics" / "epochs.jsonl")
  summary = json.loads((workdir / "summary.json").read_text())
  assert _close(steps, read_rows(GOLDEN / method / "steps.jsonl"))
  # Measured since (issue 21, on by default for Colored MNIST): the validation rates at
  # every epoch end and their rank correlation with d_speed; the rest is what it was.
  modalities = summary[names.MODALITIES]
  rates = {names.val(k) for k in names.utilization_keys(modalities)}
  assert all(rates <= set(row) for row in epochs)
  assert _close([{k: v for k, v in row.items() if k not in rates} for row in epochs],
                read_rows(GOLDEN / method / "epochs.jsonl"))
  old = json.loads((GOLDEN / method / "summary.json").read_text())
  # and (issue 31) the means over the steps of the method's own metrics (OGM-GE's)
  added = TIMINGS | {names.SPEED_UTIL_CORRELATION} | {
      names.step_mean(k) for k in names.method_step_keys(modalities)}
  assert _close({k: v for k, v in summary.items() if k not in added},
                {k: v for k, v in old.items() if k not in added})

  assert {k for r in steps for k in r} <= set(names.step_keys(modalities))
  assert {k for r in epochs for k in r} <= set(names.epoch_keys(modalities))
  assert set(summary) <= set(names.summary_keys(modalities))
