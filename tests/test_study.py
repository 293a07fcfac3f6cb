"""The study command: aggregation against hand computations, and small studies end to end
through the CLI (resume, skip, grid axis, a failed run, every experiment)."""

import json
import math

import pytest
from run_helpers import (
    CONFIG,
    MODELNET40_FLAGS,
    NVGESTURE_FLAGS,
    cli_args,
    free_port,
    run_cli,
    run_module,
    start_module,
    tiny_flags,
)

from gml_jax.runner import evaluation, study, study_report

# Student's t quantile t_{0.975} with 2 degrees of freedom, from a printed table.
T_975_DF2 = 4.302652729911275


def _runs(method, values, key="test_accuracy", point=""):
  return [{"method": method, "seed": s, "point": point, "summary": {key: v, "d_util": v}}
          for s, v in enumerate(values)]


def test_aggregate_against_hand_computed_statistics():
  runs = _runs("vanilla", [0.2, 0.3, 0.4]) + _runs("guided", [0.5, 0.45, 0.7])
  runs[5]["summary"]["d_util"] = None  # undefined: a branch scored 0
  result = study_report.aggregate(runs)
  by_method = {g["method"]: g["metrics"] for g in result["groups"]}
  vanilla, guided = by_method["vanilla"]["test_accuracy"], by_method["guided"]["test_accuracy"]
  assert vanilla["n"] == 3 and vanilla["mean"] == pytest.approx(0.3)
  assert vanilla["std"] == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / 2)
  assert guided["mean"] == pytest.approx(0.55)
  assert guided["std"] == pytest.approx(math.sqrt((0.05**2 + 0.1**2 + 0.15**2) / 2))
  d_util = by_method["guided"]["d_util"]
  assert (d_util["n"], d_util["undefined"]) == (2, 1) and d_util["mean"] == pytest.approx(0.475)

  (paired,) = [p for p in result["paired"] if p["metric"] == "test_accuracy"]
  assert paired["comparison"] == "guided - vanilla" and paired["n"] == 3
  assert paired["per_seed"] == pytest.approx({0: 0.3, 1: 0.15, 2: 0.3})
  # Differences 0.3, 0.15, 0.3: mean 0.25, std sqrt(0.015 / 2), half-width t * std / sqrt(3).
  half = T_975_DF2 * math.sqrt(0.015 / 2) / math.sqrt(3)
  assert paired["mean"] == pytest.approx(0.25)
  assert paired["ci95"] == pytest.approx((0.25 - half, 0.25 + half))
  (paired_util,) = [p for p in result["paired"] if p["metric"] == "d_util"]
  assert paired_util["n"] == 2 and paired_util["undefined"] == 1
  assert not [p for p in result["paired"] if "random" in p["comparison"]]  # no random runs


def test_statistics_of_one_value_and_of_none():
  assert study_report.mean_std([0.4]) == {"n": 1, "undefined": 0, "mean": 0.4, "std": None,
                                          "ci95": None}
  assert study_report.mean_std([None, None]) == {"n": 0, "undefined": 2, "mean": None,
                                                 "std": None, "ci95": None}
  assert study_report.t_interval([0.1]) is None
  assert study.parse_seeds("0-4") == [0, 1, 2, 3, 4] and study.parse_seeds("3,7") == [3, 7]


def _epochs(d_speed, d_util):
  return [{"epoch": i + 1, "d_speed": s, "val_d_util": u} for i, (s, u) in
          enumerate(zip(d_speed, d_util))]


def test_speed_util_correlation_of_each_run_and_its_mean_over_seeds_by_hand():
  # Per run, Spearman's ρ = 1 - 6 Σd² / (n (n² - 1)) over its epochs (no ties), by hand:
  per_seed = {
      0: (_epochs([0.3, 0.2, 0.1], [-0.5, -0.3, -0.1]), -1.0),  # ranks reversed
      1: (_epochs([0.1, 0.2, 0.3, 0.4], [0.1, 0.3, 0.2, 0.4]), 0.8),  # Σd² = 2, n = 4
      2: (_epochs([0.4, 0.1, 0.3], [0.2, 0.1, 0.3]), 0.5),  # Σd² = 2, n = 3
  }
  runs = []
  for seed, (rows, rho) in per_seed.items():
    assert evaluation.speed_util_correlation(rows) == pytest.approx(rho)
    runs.append({"method": "guided", "seed": seed, "point": "",
                 "summary": {"test_accuracy": 0.5, "speed_util_spearman": rho}})
  # Tied speeds share their mean rank: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4), Pearson's r of
  # the ranks = 4.5 / sqrt(4.5 * 5).
  tied = _epochs([0.1, 0.2, 0.2, 0.4], [0.1, 0.3, 0.2, 0.4])
  assert evaluation.speed_util_correlation(tied) == pytest.approx(4.5 / math.sqrt(22.5))
  # Fewer than 3 epochs with both values, or a constant d_util: no correlation.
  assert evaluation.speed_util_correlation(_epochs([0.1, 0.2], [0.3, 0.4])) is None
  assert evaluation.speed_util_correlation(_epochs([0.1, 0.2, 0.3], [0.3, None, 0.1])) is None
  assert evaluation.speed_util_correlation(_epochs([0.1, 0.2, 0.3], [0.0] * 3)) is None

  (group,) = study_report.aggregate(runs)["groups"]
  stat = group["metrics"]["speed_util_spearman"]
  # Mean 0.1; deviations -1.1, 0.7, 0.4: variance 1.86 / 2; half-width t * std / sqrt(3).
  half = T_975_DF2 * math.sqrt(1.86 / 2) / math.sqrt(3)
  assert stat["n"] == 3 and stat["mean"] == pytest.approx(0.1)
  assert stat["std"] == pytest.approx(math.sqrt(1.86 / 2))
  assert stat["ci95"] == pytest.approx((0.1 - half, 0.1 + half))
  table = study_report.markdown({"experiment": "colored_mnist", "command": "study",
                                 "runs": []} | study_report.aggregate(runs))
  assert f"- guided: +0.10 [{0.1 - half:+.2f}, {0.1 + half:+.2f}] (n = 3)" in table


def _study(*args, devices=1, timeout=900):
  return run_module("gml_jax.runner.study", *args, devices=devices, timeout=timeout)


def test_study_end_to_end_resumes_an_unfinished_run_and_skips_finished_ones(data_dir, tmp_path):
  args = [f"--config={CONFIG}", "--methods=vanilla,guided", "--seeds=0-1",
          f"--workdir={tmp_path}", *tiny_flags(data_dir, utilization_every_epoch=True)]
  # An earlier study stopped inside guided seed 0 (the run the study would start).
  partial = tmp_path / "guided" / "seed_0"
  stopped = run_cli(*cli_args(
      "guided", partial, data_dir, "--stop_after_steps=3", seed=0, utilization_every_epoch=True),
      devices=2)
  assert stopped.returncode == 0, stopped.stderr[-3000:]

  result = _study(*args, devices=2)  # runs on 2 devices, as a plain run would
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert result.stdout.count("started") == 4 and result.stdout.count("finished") == 4
  assert "Resuming" in (partial / "run.log").read_text()
  saved = json.loads((tmp_path / "study.json").read_text())
  assert [(g["method"], g["seeds"]) for g in saved["groups"]] == [("vanilla", [0, 1]),
                                                                  ("guided", [0, 1])]
  summaries = {(m, s): json.loads((tmp_path / m / f"seed_{s}" / "summary.json").read_text())
               for m in ("vanilla", "guided") for s in (0, 1)}
  guided_acc = [summaries[("guided", s)]["test_accuracy"] for s in (0, 1)]
  (guided,) = [g for g in saved["groups"] if g["method"] == "guided"]
  assert guided["metrics"]["test_accuracy"]["mean"] == pytest.approx(sum(guided_acc) / 2)
  assert {json.loads((tmp_path / "guided" / f"seed_{s}" / "config.json").read_text())["seed"]
          for s in (0, 1)} == {0, 1}
  table = (tmp_path / "study.md").read_text()
  assert "| guided | 2 |" in table and "guided - vanilla" in table
  for name in ("accuracy", "speeds", "validation", "utilization", "speed_vs_utilization"):
    assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
  assert not (tmp_path / "plots" / "grid.png").exists()  # no grid axis

  again = _study(*args)
  assert again.returncode == 0 and again.stdout.count("skipped") == 4
  assert "started" not in again.stdout
  assert json.loads((tmp_path / "study.json").read_text())["groups"] == saved["groups"]


def test_grid_axis_in_the_table_and_a_failed_run_reported(data_dir, tmp_path):
  # A learning rate of 1e6 passes the config's checks but diverges: that run fails (at
  # run time, as any run can), the other aggregates.
  result = _study(f"--config={CONFIG}", "--methods=guided", "--seeds=0",
                  "--grid=optimizer.learning_rate=1e6,0.01", f"--workdir={tmp_path}",
                  *tiny_flags(data_dir))
  assert result.returncode == 1
  failed_log = tmp_path / "optimizer.learning_rate=1e6" / "guided" / "seed_0" / "run.log"
  assert (f"FAILED: optimizer.learning_rate=1e6 guided seed 0; exit 1; log: {failed_log}"
          in result.stdout)
  assert "The training loss is" in failed_log.read_text()
  assert result.stderr.strip().splitlines()[-1].startswith(
      "Error: 1 of 2 runs left out of the study: optimizer.learning_rate=1e6 guided seed 0")
  table = (tmp_path / "study.md").read_text()
  assert "## optimizer.learning_rate=0.01" in table and "| guided | 1 |" in table
  assert "## optimizer.learning_rate=1e6" not in table and "Failed runs" in table
  config = json.loads((tmp_path / "optimizer.learning_rate=0.01" / "guided" / "seed_0" /
                       "config.json").read_text())
  assert config["optimizer"]["learning_rate"] == 0.01
  # A numeric axis: test ŷ and the shares against it, from the runs that finished.
  assert (tmp_path / "plots" / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_grid_field_and_method_are_refused_before_any_run(tmp_path):
  result = _study(f"--config={CONFIG}", "--grid=balance.windw=1,2", f"--workdir={tmp_path}")
  assert result.returncode != 0 and "no field 'balance.windw'" in result.stderr
  result = _study(f"--config={CONFIG}", "--methods=greedy", f"--workdir={tmp_path}")
  assert result.returncode != 0 and "Unknown methods ['greedy']" in result.stderr
  assert not list(tmp_path.iterdir())


# Between them, the two cover every variant beyond the paper's on a real backbone: OGM-GE and
# late fusion on the ResNet-18 pair, a uni-modal I3D beside the I3D pair (Colored MNIST runs
# them all in tests/test_experiments.py).
@pytest.mark.xdist_group("resnet18")
def test_study_runs_modelnet40_around_a_finished_cli_run(modelnet40_study):
  # guided seed 0 is already there: the CLI run of tests/conftest.py, with this study's flags.
  study_dir, _ = modelnet40_study
  methods = "vanilla,guided,ogm_ge,late_fusion"
  result = _study("--config=experiments/modelnet40.py", f"--methods={methods}", "--seeds=0",
                  f"--workdir={study_dir}", f"--config.data.data_dir={study_dir.parent / 'tfds'}",
                  *MODELNET40_FLAGS)
  assert "skipped guided seed 0: finished before" in result.stdout
  metrics = _check_study(result, study_dir, "modelnet40", methods,
                         ["vanilla - late_fusion", "guided - vanilla", "guided - ogm_ge",
                          "ogm_ge - vanilla"])
  assert "d_util" in metrics["ogm_ge"] and "d_util" not in metrics["late_fusion"]


@pytest.mark.xdist_group("i3d")
def test_study_runs_nvgesture_around_a_finished_cli_run(nvgesture_study):
  # guided seed 0 is already there: the CLI run of tests/conftest.py, with this study's flags.
  study_dir, _ = nvgesture_study
  methods = "vanilla,guided,unimodal_1"
  result = _study("--config=experiments/nvgesture.py", f"--methods={methods}", "--seeds=0",
                  f"--workdir={study_dir}", f"--config.data.data_dir={study_dir.parent / 'tfds'}",
                  *NVGESTURE_FLAGS)
  assert "skipped guided seed 0: finished before" in result.stdout
  metrics = _check_study(result, study_dir, "nvgesture", methods, ["guided - vanilla"])
  unimodal = metrics["unimodal_1"]
  assert unimodal["test_accuracy"] == unimodal["test_branch_1_accuracy"]
  assert "test_branch_0_accuracy" not in unimodal and "d_util" not in unimodal


def _check_study(result, study_dir, experiment, methods, comparisons) -> dict:
  """Checks a one-seed study of ``methods``; returns each method's metrics."""
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  saved = json.loads((study_dir / "study.json").read_text())
  assert saved["experiment"] == experiment
  assert [g["method"] for g in saved["groups"]] == methods.split(",")
  # One seed: a mean but no spread, and no interval for the paired differences.
  paired = [p for p in saved["paired"] if p["metric"] == "test_accuracy"]
  assert [p["comparison"] for p in paired] == comparisons
  assert all(p["n"] == 1 and p["ci95"] is None for p in paired)
  assert (study_dir / "plots" / "speeds.png").exists()
  return {g["method"]: g["metrics"] for g in saved["groups"]}


def test_study_as_a_two_process_job(data_dir, tmp_path):
  port = free_port()
  studies = [start_module(
      "gml_jax.runner.study", f"--config={CONFIG}", "--methods=guided", "--seeds=0",
      f"--workdir={tmp_path}", *tiny_flags(data_dir),
      f"--run_args=--distributed --coordinator_address=127.0.0.1:{port} --num_processes=2 "
      f"--process_id={i}", devices=2) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in studies]
  for p, (out, err) in zip(studies, outputs):
    assert p.returncode == 0, out[-2000:] + err[-2000:]
  assert "the study of process 0 writes the aggregate" in outputs[1][0]
  summary = json.loads((tmp_path / "guided" / "seed_0" / "summary.json").read_text())
  assert summary["steps"] == 10 and summary["test_examples"] == 99
  saved = json.loads((tmp_path / "study.json").read_text())
  assert saved["groups"][0]["metrics"]["test_accuracy"]["mean"] == summary["test_accuracy"]
