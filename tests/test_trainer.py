"""The trainer and its CLI (gml_jax/runner/trainer.py, main.py): the Colored MNIST job end to
end on dummy data: artifacts, resume, bad input, a diverging loss."""

import json
import math

import jax
import numpy as np
import pytest
from run_helpers import (
  CONFIG,
  DUMMY,
  assert_states_close,
  epoch_rows,
  restore_latest,
  run_cli,
  run_module,
  step_rows,
  tiny_config,
  tiny_flags,
)

from gml_jax import utilization
from gml_jax.runner import build, pipeline, trainer
from gml_jax.runner import dataset as datasets


@pytest.mark.parametrize("method", ["vanilla", "random", "guided"])
def test_cli_trains_and_writes_artifacts(method, data_dir, tmp_path):
  workdir = tmp_path / "run"
  result = run_cli(f"--config={CONFIG}:{method}", f"--workdir={workdir}", *tiny_flags(data_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "test_biased accuracy" in result.stdout and "u(m1|m0)" in result.stdout

  config = json.loads((workdir / "config.json").read_text())
  assert config["balance"]["method"] == method and config["model"]["small_cnn"]["width"] == 4
  steps = step_rows(workdir)
  epochs = epoch_rows(workdir)
  assert [r["step"] for r in steps] == list(range(1, 11)) and [r["epoch"] for r in epochs] == [1, 2]
  assert (workdir / "metrics" / "steps.csv").read_text().startswith("step,")
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  for name in ("speeds", "accuracy", "utilization"):
    assert (workdir / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
  assert len(list((workdir / "checkpoints" / "latest").iterdir())) == 1
  assert len(list((workdir / "checkpoints" / "best").iterdir())) == 1

  summary = json.loads((workdir / "summary.json").read_text())
  for key in ("test_accuracy", "test_biased_accuracy", "test_branch_0_accuracy",
              "test_branch_1_accuracy", "best_val_accuracy", "rebalance_share_m0",
              "rebalance_share_m1"):
    assert 0.0 <= summary[key] <= 1.0, key
  for key in ("u(m1|m0)", "u(m0|m1)", "d_util", "train_seconds", "samples_per_s"):
    assert math.isfinite(summary[key]), key
  targets = [r["target"] for r in steps]
  assert summary["rebalance_share_m0"] == pytest.approx(targets.count(0) / 10)
  assert summary["data_source"] == "idx" and summary["steps"] == 10
  if method == "vanilla":
    assert set(targets) == {-1}
  else:  # warm-up is the first epoch (5 steps); re-balancing happens after it only
    assert set(targets[:5]) == {-1} and set(targets[5:]) & {0, 1}


# The tiny random run (decisions from seed and step), uninterrupted and one step a call, that
# two tests compare with: on one xdist worker, made once.
ON_THE_RANDOM_RUN_WORKER = pytest.mark.xdist_group("random_run")


@pytest.fixture(scope="module")
def random_run(data_dir, tmp_path_factory):
  """(the workdir, the summary) of the tiny random run."""
  workdir = tmp_path_factory.mktemp("random") / "run"
  return workdir, trainer.train_and_evaluate(tiny_config("random", data_dir), workdir)


@ON_THE_RANDOM_RUN_WORKER
def test_resume_matches_uninterrupted_run(random_run, data_dir, tmp_path):
  config = tiny_config("random", data_dir)
  whole_dir, whole = random_run
  # Interrupted mid-epoch (step 3 of 5), then twice more, then finished.
  for stop in (3, 7):
    assert trainer.train_and_evaluate(config, tmp_path / "resumed", stop_after_steps=stop) is None
  resumed = trainer.train_and_evaluate(config, tmp_path / "resumed")

  (s1, state1) = restore_latest(whole_dir)
  (s2, state2) = restore_latest(tmp_path / "resumed")
  assert s1 == s2 == 10
  assert_states_close(state1, state2, rtol=1e-6, atol=1e-7)
  for key in ("test_accuracy", "u(m1|m0)", "u(m0|m1)", "rebalance_share_m0", "best_step"):
    assert whole[key] == pytest.approx(resumed[key], abs=1e-6), key
  a, b = step_rows(whole_dir), step_rows(tmp_path / "resumed")
  assert [r["step"] for r in b] == list(range(1, 11))
  for ra, rb in zip(a, b):
    assert ra["target"] == rb["target"]
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_unknown_config_field_is_an_error(data_dir, tmp_path):
  result = run_cli(f"--config={CONFIG}:guided", f"--workdir={tmp_path}",
                   "--config.balance.alpah=0.1")
  assert result.returncode != 0
  assert "alpah" in result.stderr
  assert not (tmp_path / "config.json").exists()


def test_unknown_variant_is_an_error(tmp_path):
  result = run_cli(f"--config={CONFIG}:greedy", f"--workdir={tmp_path}")
  assert result.returncode != 0 and "Unknown variant 'greedy'" in result.stderr


def test_missing_manual_dataset(tmp_path):
  config = tiny_config("guided", tmp_path / "tfds")
  config.data.manual_dir = str(tmp_path / "no_mnist_here")
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    trainer.train_and_evaluate(config, tmp_path / "run")


def test_workdir_of_another_config_is_refused(data_dir, tmp_path):
  config = tiny_config("guided", data_dir)
  trainer.train_and_evaluate(config, tmp_path, stop_after_steps=2)
  saved = (tmp_path / "config.json").read_text()
  other = tiny_config("guided", data_dir)
  other.optimizer.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"another config \(differs in: optimizer.learning_rate\)"):
    trainer.train_and_evaluate(other, tmp_path)
  assert (tmp_path / "config.json").read_text() == saved  # nothing overwritten
  assert restore_latest(tmp_path)[0] == 2


def test_print_config_shows_overrides():
  result = run_cli(f"--config={CONFIG}:random", "--config.balance.random.window=7",
                   "--print_config")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "window: 7" in result.stdout and "method: random" in result.stdout


@ON_THE_RANDOM_RUN_WORKER
def test_steps_per_call_gives_the_same_run(random_run, data_dir, tmp_path):
  one_dir, a = random_run  # one step a call
  three = tiny_config("random", data_dir)
  three.steps_per_call = 3  # 5 steps per epoch: one 3-step call, then 2 single steps
  b = trainer.train_and_evaluate(three, tmp_path / "three")
  rows_a = step_rows(one_dir)
  rows_b = step_rows(tmp_path / "three")
  assert [r["step"] for r in rows_b] == list(range(1, 11))
  assert [r["target"] for r in rows_a] == [r["target"] for r in rows_b]
  assert_states_close(restore_latest(one_dir)[1], restore_latest(tmp_path / "three")[1])
  assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)


def test_bfloat16_run_takes_the_same_decisions_as_float32(data_dir, tmp_path):
  runs = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config("guided", data_dir)
    config.model.dtype, config.num_epochs, config.log_every_steps = dtype, 3, 1
    trainer.train_and_evaluate(config, tmp_path / dtype)
    runs[dtype] = [json.loads(line) for line in
                   (tmp_path / dtype / "metrics/steps.jsonl").read_text().splitlines()]
  f32, bf16 = runs["float32"], runs["bfloat16"]
  # A clear speed gap: every decision after warm-up is far from the threshold α = 0.01.
  assert min(abs(r["d_speed"]) for r in f32[4:]) > 0.05
  assert [r["target"] for r in bf16] == [r["target"] for r in f32]
  assert any(r["target"] >= 0 for r in f32)
  for a, b in zip(f32, bf16):  # bfloat16 rounding, not another trajectory
    assert b["d_speed"] == pytest.approx(a["d_speed"], abs=0.02)
    assert b["loss"] == pytest.approx(a["loss"], rel=0.05)


def test_make_data_builds_then_checks_without_training(tmp_path):
  args = [f"--config={CONFIG}", f"--config.data.data_dir={tmp_path / 'tfds'}",
          f"--config.data.manual_dir={DUMMY}"]
  prepare = lambda *extra: run_module("gml_jax.runner.prepare", *args, *extra)
  first, again = prepare(), prepare()
  assert first.returncode == 0 and again.returncode == 0, first.stderr[-2000:]
  assert "Building colored_mnist/var_0.02" in first.stdout and "Building" not in again.stdout
  version_dir = tmp_path / "tfds" / "colored_mnist" / "var_0.02" / "1.0.0"
  assert f"colored_mnist/var_0.02: {version_dir}" in again.stdout
  assert "built from manual files" in again.stdout
  size = sum(p.stat().st_size for p in version_dir.rglob("*") if p.is_file())
  assert f"  {'on disk':12} {size / 1e6:>8,.1f} MB" in again.stdout
  for split, count in (("train", 189), ("validation", 21), ("test", 99), ("test_biased", 99)):
    assert f"  {split:12} {count:>8,} examples" in again.stdout
  other = prepare("--config.data.manual_dir=")  # a build from manual files is not the default
  assert other.returncode != 0
  assert other.stderr.strip().splitlines()[-1].startswith("Error: The dataset in ")


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  config = tiny_config("guided", data_dir)
  config.optimizer.learning_rate, config.optimizer.momentum = 1e6, 0.0
  config.log_every_steps, config.checkpoint_every_steps = 1, 1
  with pytest.raises(FloatingPointError, match=r"The training loss is (nan|inf) at step \d+"):
    trainer.train_and_evaluate(config, tmp_path)
  if (tmp_path / "checkpoints" / "latest").exists() and any(
      (tmp_path / "checkpoints" / "latest").iterdir()):
    _, state = restore_latest(tmp_path)
    for leaf in jax.tree.leaves(state):
      assert np.all(np.isfinite(leaf))


def test_utilization_at_epoch_ends_equals_the_after_training_measure(tmp_path):
  """The fixed control on the embedded 5,000 digits (small CNN), the validation rates at
  every epoch end, their means from the first 100 training examples: the last epoch's values
  equal the library's measure on the same checkpoint and split, and the summary's rank
  correlation of d_speed and d_util is Spearman's, computed here by hand."""
  config = tiny_config("fixed_1", tmp_path / "tfds")
  config.data.manual_dir = ""  # the embedded default: 3,600 training and 400 validation digits
  config.batch_size, config.num_epochs, config.log_every_steps = 128, 3, 20
  config.utilization_every_epoch, config.utilization_train_examples = True, 100
  summary = trainer.train_and_evaluate(config, tmp_path / "run")
  # Warm-up (28 steps), then one normal step and Q = 5 re-balancing steps for m1, repeated.
  targets = [r["target"] for r in step_rows(tmp_path / "run")]
  assert targets == [-1 if t < 28 or (t - 28) % 6 == 0 else 1 for t in range(84)]

  dataset = datasets.open_dataset(config.data)
  train = dataset.sources["train"]
  first_100 = [train[i] for i in range(100)]
  batches = lambda source: list(pipeline.host_eval_batches(source, dataset.prep, 64))
  model = build.model(config, dataset.num_classes)
  step, state = restore_latest(tmp_path / "run")  # the last epoch end's
  variables = {"params": state["params"], **state["model_state"]}
  measured = utilization.conditional_utilization(model, variables, batches(first_100),
                                                 batches(dataset.sources["validation"]))
  rows = epoch_rows(tmp_path / "run")
  assert step == rows[-1]["step"] == 84
  assert rows[-1]["val_u(m1|m0)"] == pytest.approx(measured.rates[1, 0], abs=1e-6)
  assert rows[-1]["val_u(m0|m1)"] == pytest.approx(measured.rates[0, 1], abs=1e-6)
  assert rows[-1]["val_d_util"] == pytest.approx(measured.d_util, abs=1e-6)
  assert measured.d_util != 0
  # The option is honoured: the means of all the training examples are other means.
  subset_means = utilization.training_means(model, variables, batches(first_100))
  all_means = utilization.training_means(model, variables, batches(train))
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(subset_means),
                                                   jax.tree.leaves(all_means)))

  speeds, utils = [r["d_speed"] for r in rows], [r["val_d_util"] for r in rows]
  assert len(set(speeds)) == len(set(utils)) == 3  # no ties: ρ = 1 - 6 Σd² / (n (n² - 1))
  rank = lambda xs: np.argsort(np.argsort(xs))
  d = rank(speeds) - rank(utils)
  assert summary["speed_util_spearman"] == pytest.approx(1 - 6 * np.sum(d ** 2) / (3 * 8))
  assert (tmp_path / "run" / "plots" / "speed_vs_utilization.png").read_bytes()[:4] == b"\x89PNG"
