"""Checkpoints (gml_jax/runner/checkpoints.py) in-process: one of another model is refused
and left untouched. (Kills mid-save and damaged files: tests/test_faults.py.)"""

import shutil

import pytest
from run_helpers import restore_latest, tiny_config

from gml_jax.runner import trainer


def test_checkpoint_of_another_model_is_refused(data_dir, tmp_path):
  small = tiny_config("guided", data_dir)
  trainer.train_and_evaluate(small, tmp_path / "small", stop_after_steps=2)
  wide = tiny_config("guided", data_dir)
  wide.model.small_cnn.width = 8
  shutil.copytree(tmp_path / "small" / "checkpoints", tmp_path / "wide" / "checkpoints")
  with pytest.raises(ValueError, match="does not fit this model and optimizer"):
    trainer.train_and_evaluate(wide, tmp_path / "wide")
  assert restore_latest(tmp_path / "wide")[0] == 2  # the foreign checkpoint is untouched
