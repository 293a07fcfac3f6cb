"""docs/methods/adding_a_method.md, followed to the letter: its files are written into a
copy of the repository (nothing else changes there), its test is run, and the toy method
runs in a one-epoch study whose logs, plot and study.json hold its metrics."""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from run_helpers import ROOT, cli_env, read_jsonl, tiny_flags

GUIDE = ROOT / "docs" / "methods" / "adding_a_method.md"
COPIED = ("gml_jax", "experiments", "data_prep")


def guide_files() -> dict[str, str]:
  """The guide's Python blocks that start with a ``# <path>`` line: path -> text."""
  blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
  return {block.splitlines()[0][2:].strip(): block for block in blocks
          if block.startswith("# ") and block.splitlines()[0].endswith(".py")}


def test_the_guide_names_a_module_a_registration_and_a_test():
  assert sorted(guide_files()) == ["gml_jax/damp_leader.py",
                                   "gml_jax/runner/methods/damp_leader.py",
                                   "tests/test_damp_leader.py"]


def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def test_a_method_added_as_the_guide_says_runs_in_a_study(data_dir, tmp_path):
  repo = tmp_path / "repo"
  for part in COPIED:
    shutil.copytree(ROOT / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
  files = guide_files()
  for path, text in files.items():
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text(text)

  # Its test, against its module.
  try:
    _load(repo / "gml_jax" / "damp_leader.py", "gml_jax.damp_leader")
    test = _load(repo / "tests" / "test_damp_leader.py", "test_damp_leader")
    test.test_the_leader_is_damped_and_the_rest_pass()
  finally:
    sys.modules.pop("gml_jax.damp_leader", None)
    sys.modules.pop("test_damp_leader", None)

  # A one-epoch study in the copy, which knows the method from its two files alone.
  study_dir = tmp_path / "study"
  env = cli_env(1) | {"PYTHONPATH": str(repo)}
  result = subprocess.run(
      [sys.executable, "-m", "gml_jax.runner.study", "--config=experiments/colored_mnist.py",
       "--methods=damp_leader", "--seeds=0", f"--workdir={study_dir}",
       *tiny_flags(data_dir, num_epochs=1),
       "--config.balance.damp_leader.factor=0.2"],
      cwd=repo, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  run = study_dir / "damp_leader" / "seed_0"
  rows = read_jsonl(run / "metrics" / "steps.jsonl")
  assert rows and all({"damp_factor_0", "damp_factor_1", "d_speed"} <= set(r) for r in rows)
  # the leader's factor is the option's, the other's 1, at every step
  assert all(sorted((r["damp_factor_0"], r["damp_factor_1"])) == pytest.approx([0.2, 1.0])
             for r in rows)
  summary = json.loads((run / "summary.json").read_text())
  mean_0 = sum(r["damp_factor_0"] for r in rows) / len(rows)
  assert abs(summary["mean_damp_factor_0"] - mean_0) < 1e-6
  assert (run / "plots" / "damp_leader.png").stat().st_size > 0
  # the study's own: the metrics over its seeds
  assert (study_dir / "plots" / "damp_leader.png").read_bytes()[:4] == b"\x89PNG"
  (group,) = json.loads((study_dir / "study.json").read_text())["groups"]
  assert group["method"] == "damp_leader"
  assert abs(group["metrics"]["mean_damp_factor_0"]["mean"] - mean_0) < 1e-6
  assert "mean_damp_factor_1" in (study_dir / "study.md").read_text()
  assert not os.path.exists(ROOT / "gml_jax" / "damp_leader.py")  # the clone is untouched
