"""The study's other variants end to end on dummy Colored MNIST: each modality alone, late
fusion (no MMTM), OGM-GE on the paper's model and as its authors run it; and the config
checks that keep them consistent."""

import math

import numpy as np
import pytest
from run_helpers import assert_states_close, read_jsonl, restore_latest, tiny_config

from gml_jax.runner import build, pipeline, trainer
from gml_jax.runner.methods import ogm_ge as ogm_registration


def _rows(workdir, name="steps"):
  return read_jsonl(workdir / "metrics" / f"{name}.jsonl")


@pytest.mark.parametrize("modality,feature,channels", [(0, "gray", 1), (1, "colored", 3)])
def test_unimodal_run_reads_its_modality_alone(modality, feature, channels, data_dir, tmp_path):
  config = tiny_config(f"unimodal_{modality}", data_dir)
  assert config.data.modalities == (modality,) and config.model.fusion == "none"
  prep = pipeline.Preprocess.from_config(config.data)
  assert prep.modalities == (feature,)
  example = {"gray": np.zeros((2, 28, 28, 1), np.uint8), "colored": np.zeros((2, 28, 28, 3),
                                                                               np.uint8),
             "label": np.zeros(2, np.int64)}
  (only,) = prep.batch(example)["inputs"]
  assert only.shape == (2, 28, 28, channels)

  summary = trainer.train_and_evaluate(config, tmp_path)
  _, state = restore_latest(tmp_path)
  assert set(state["params"]) == {"branches_0"}  # one branch, no fusion layers
  assert summary["modalities"] == [modality] and summary["fusion"] == "none"
  # ŷ of one branch is that branch: the fused and the branch accuracy are one number.
  assert summary["test_accuracy"] == summary[f"test_branch_{modality}_accuracy"]
  assert summary["test_biased_accuracy"] == summary[f"test_biased_branch_{modality}_accuracy"]
  assert f"test_branch_{1 - modality}_accuracy" not in summary
  assert not [k for k in summary if k.startswith("u(") or k == "d_util"]
  rows = _rows(tmp_path)
  assert {r["target"] for r in rows} == {-1} and "d_speed" not in rows[0]
  assert f"branch_{modality}_accuracy" in rows[0] and f"branch_{1 - modality}_loss" not in rows[0]
  assert f"val_branch_{modality}_accuracy" in _rows(tmp_path, "epochs")[0]
  assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy.png"]


def test_late_fusion_has_two_independent_branches(data_dir, tmp_path):
  summary = trainer.train_and_evaluate(tiny_config("late_fusion", data_dir), tmp_path)
  _, state = restore_latest(tmp_path)
  assert set(state["params"]) == {"branches_0", "branches_1"}  # no fusion_<i> modules
  assert set(state["model_state"]) == {"batch_stats"}  # no fusion running means
  for key in ("test_accuracy", "test_branch_0_accuracy", "test_branch_1_accuracy"):
    assert 0 <= summary[key] <= 1
  assert not [k for k in summary if k.startswith("u(")]
  assert summary["rebalance_share_m0"] == summary["rebalance_share_m1"] == 0.0
  assert "d_speed" not in _rows(tmp_path)[0]


def test_ogm_ge_run_logs_ratios_and_coefficients_and_resumes_exactly(data_dir, tmp_path):
  config = tiny_config("ogm_ge", data_dir)
  whole = trainer.train_and_evaluate(config, tmp_path / "whole")
  rows = _rows(tmp_path / "whole")
  for r in rows:  # the published coefficient of every step, from the logged ratios
    assert r["ogm_ratio_0"] * r["ogm_ratio_1"] == pytest.approx(1, rel=1e-5)
    for k in (0, 1):
      rho = r[f"ogm_ratio_{k}"]
      expected = 1 - math.tanh(config.balance.ogm_ge.alpha * rho) if rho > 1 else 1.0
      assert r[f"ogm_coefficient_{k}"] == pytest.approx(expected, rel=1e-5)
    assert r["target"] == -1 and math.isfinite(r["d_speed"])  # speeds measured, no re-balancing
  assert (tmp_path / "whole" / "plots" / "ogm_ge.png").exists()
  assert math.isfinite(whole["d_util"])

  # The noise is a function of (seed, step): a run stopped mid-epoch continues exactly.
  assert trainer.train_and_evaluate(config, tmp_path / "resumed", stop_after_steps=3) is None
  resumed = trainer.train_and_evaluate(config, tmp_path / "resumed")
  assert_states_close(restore_latest(tmp_path / "whole")[1],
                      restore_latest(tmp_path / "resumed")[1], rtol=1e-6, atol=1e-7)
  assert whole["test_accuracy"] == pytest.approx(resumed["test_accuracy"], abs=1e-6)


def test_ogm_ge_joint_run_modulates_inside_its_epochs_only(data_dir, tmp_path):
  """The authors' recipe: one joint head trained on the fused loss, modulation in epoch 0
  alone (ogm_ge.epochs (0, 0) of 2 epochs of 5 steps); its baseline has the same model."""
  config = tiny_config("ogm_ge_joint", data_dir)
  assert (config.model.head, config.model.fusion, config.balance.ogm_ge.scope) == (
      "joint", "none", "encoder_kernels")
  config.balance.ogm_ge.epochs = (0, 0)
  summary = trainer.train_and_evaluate(config, tmp_path)
  _, state = restore_latest(tmp_path)
  assert set(state["params"]) == {"branches_0", "branches_1", "head"}
  assert not [k for k in state["params"]["branches_0"] if k.startswith("head")]
  rows = _rows(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 11))
  for r in rows:
    modulating = r["step"] <= 5  # steps 1-5 are epoch 0
    for k in (0, 1):
      rho = r[f"ogm_ratio_{k}"]
      expected = 1 - math.tanh(config.balance.ogm_ge.alpha * rho) if rho > 1 and modulating else 1
      assert r[f"ogm_coefficient_{k}"] == pytest.approx(expected, rel=1e-5)
    assert r["target"] == -1 and "d_speed" not in r  # no fusion layers: no speeds
  assert 0 <= summary["test_branch_0_accuracy"] <= 1 and "d_util" not in summary
  assert summary["fusion"] == "none"
  baseline = tiny_config("late_fusion_joint", data_dir)
  assert (baseline.model.head, baseline.balance.method) == ("joint", "vanilla")


def test_ogm_epochs_become_a_window_of_updates():
  config = tiny_config("ogm_ge_joint", "/unused")
  assert config.balance.ogm_ge.epochs == (0, 5)  # the authors' first half: of 10 epochs here
  assert ogm_registration.update_window((0, 5), 7) == (0, 42)  # epochs 0-5: updates 0-41
  assert ogm_registration.update_window((2, 3), 10) == (20, 40)
  assert ogm_registration.update_window((), 10) is None


@pytest.mark.parametrize("variant,field,value,message", [
    ("guided", "model.fusion", "none", "config.balance.method='guided' needs fusion layers"),
    ("random", "model.fusion", "none", "config.balance.method='random' needs fusion layers"),
    ("vanilla", "data.modalities", (1,), "config.model.fusion='mmtm' needs two or more"),
    ("unimodal_0", "balance.method", "ogm_ge", "'ogm_ge' needs two or more data.modalities"),
    ("vanilla", "data.modalities", (0, 2), r"config.data.modalities=\(0, 2\) is invalid"),
    ("vanilla", "data.modalities", (1, 1), r"config.data.modalities=\(1, 1\) is invalid"),
    ("vanilla", "model.fusion", "early", r"config.model.fusion='early' is unknown"),
    ("ogm_ge", "balance.ogm_ge.alpha", 0.0, r"config.balance.ogm_ge.alpha=0.0 is invalid"),
    ("ogm_ge_joint", "model.fusion", "mmtm",
     r"config.model.head='joint' .* needs model.fusion='none' and two or more"),
    ("late_fusion_joint", "data.modalities", (0,), r"data.modalities=\(0,\)"),
    ("ogm_ge", "balance.ogm_ge.epochs", (3, 1), r"config.balance.ogm_ge.epochs=\(3, 1\) is "
     r"invalid: "
     r"expected \(\) \(every epoch\) or \(first, last\)"),
    ("ogm_ge", "balance.ogm_ge.scope", "heads", r"config.balance.ogm_ge.scope='heads' is "
     "unknown"),
    ("vanilla", "model.head", "shared", r"config.model.head='shared' is unknown"),
    ("fixed_1", "balance.fixed.target", 2, r"config.balance.fixed.target=2 is invalid: method "
     r"'fixed' "
     r"re-balances a branch, and the model has 2"),
    ("fixed_0", "model.fusion", "none", "config.balance.method='fixed' needs fusion layers"),
    ("guided", "balance.random.shares", (0.5, 0.5), r"config.balance.random.shares=\(0.5, 0.5\) "
     r"is set, but balance.method='guided' does not read it: set balance.method='random'"),
    ("random", "balance.random.shares", (0.5,), r"random.shares=\(0.5,\) is invalid: expected "
     r"\(\) or one share per branch \(2\)"),
    ("random", "balance.random.shares", (0.75, 0.5), r"config.balance.random.shares=\(0.75, 0.5\) "
     r"is invalid: expected \(\) \(uniform draws\) or one probability in \[0, 1\] per modality"),
])
def test_inconsistent_variants_are_refused(variant, field, value, message, tmp_path):
  config = tiny_config(variant, tmp_path)
  *sections, name = field.split(".")
  build.config_field(config, ".".join(sections))[name] = value
  with pytest.raises(ValueError, match=message):
    build.check_config(config)


@pytest.mark.parametrize("experiment", ["cremad", "kinetics_sounds", "mfeat"])
def test_the_field_datasets_configs_are_consistent_in_every_variant(experiment):
  import importlib

  from gml_jax.runner import build, names

  module = importlib.import_module(f"experiments.{experiment}")
  for variant in names.VARIANTS:
    if variant == "random_matched" or variant.startswith("fixed_"):
      continue  # two-branch controls, checked on Colored MNIST
    build.check_config(module.get_config(variant))
  config = module.get_config()
  if experiment != "mfeat":  # the reference's recipe
    assert (config.optimizer.learning_rate, config.optimizer.weight_decay) == (1e-3, 1e-4)
    assert (config.schedule.name, config.schedule.step_epochs, config.schedule.factor,
            config.batch_size, config.num_epochs) == ("step", 70, 0.1, 64, 100)
    assert config.data.builder_config == {"cremad": "frames_1",
                                          "kinetics_sounds": "frames_3"}[experiment]


def test_a_run_with_an_epoch_hook_resumes_exactly(data_dir, tmp_path):
  # PMR's prototypes live in the optimizer state (as InfoReg's anchor and trace, through the
  # same hook): a run stopped mid-epoch (step 3 of 5; its epoch's prototypes come from the
  # checkpoint) and at an epoch's end (step 5: the next epoch's hook not yet run) continues
  # as the unbroken run did, step for step.
  method = "pmr"
  config = tiny_config(method, data_dir)
  whole = trainer.train_and_evaluate(config, tmp_path / "whole")
  for stop in (3, 5):
    assert trainer.train_and_evaluate(config, tmp_path / "resumed", stop_after_steps=stop) is None
  resumed = trainer.train_and_evaluate(config, tmp_path / "resumed")
  assert_states_close(restore_latest(tmp_path / "whole")[1],
                      restore_latest(tmp_path / "resumed")[1], rtol=1e-6, atol=1e-7)
  a, b = _rows(tmp_path / "whole"), _rows(tmp_path / "resumed")
  assert [r["step"] for r in b] == list(range(1, 11))
  own = [k for k in a[0] if k.startswith(method)]
  assert own  # the method's metrics: ratios, coefficients, windows ...
  for ra, rb in zip(a, b):
    for key in ["loss", *own]:
      assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
  assert whole["test_accuracy"] == pytest.approx(resumed["test_accuracy"], abs=1e-6)
