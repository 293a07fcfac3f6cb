"""Test setup: 8 simulated CPU devices (set before JAX starts), float32 matmuls, quick XLA
compilation, and one persistent XLA compilation cache per test worker, which every run the
tests start inherits: the same small models compile once per worker instead of once per
process."""

import os
import pathlib
import shutil
import tempfile

# XLA:CPU compiles without LLVM's expensive optimisations in tests: the tests' models are
# tiny, so compiling is most of their time (measured: a dummy NVGesture run 80 s -> 54 s).
# Runs the tests start get the same flags (run_helpers.cli_env).
os.environ.setdefault("GML_JAX_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0 "
                                                "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), os.environ["GML_JAX_TEST_XLA_FLAGS"],
    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A fresh cache per `pytest` (set once, inherited by the xdist workers), a folder per worker:
# no two workers write one entry at once. (One cache for all, with JAX's file lock around
# every access, measured slower: 275 s against 253 s for test_faults and test_trainer.)
_CACHE = pathlib.Path(os.environ.setdefault(
    "GML_JAX_TEST_XLA_CACHE", tempfile.mkdtemp(prefix="gml_jax_tests_xla_cache_")))
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(
    _CACHE / os.environ.get("PYTEST_XDIST_WORKER", "main"))
# Programs that took a second or more to compile: the steps and evaluations, not the small
# eager operations (caching those too doubles what is written for little gain).
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402  (after the flags)

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The Colored MNIST dummy dataset, built once per session."""
  from run_helpers import tiny_config

  from gml_jax.runner import dataset

  path = tmp_path_factory.mktemp("tfds")
  dataset.load_builder(tiny_config("guided", path).data)
  return path


@pytest.fixture(scope="session")
def one_process_run(data_dir, tmp_path_factory):
  """The tiny guided run as one process on 4 devices (its workdir): what a job of two
  processes with 2 devices each must equal. Its tests share an xdist group, ONE_PROCESS_RUN,
  so that one worker makes it once."""
  from run_helpers import cli_args, run_cli

  workdir = tmp_path_factory.mktemp("one_process") / "run"
  result = run_cli(*cli_args("guided", workdir, data_dir), devices=4)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _study_around_a_cli_run(tmp_path_factory, experiment: str, flags: list[str]):
  """A study folder (its dataset beside it, in ``../tfds``) holding one finished run, guided
  seed 0 of ``experiment`` with ``flags``, made by the plain CLI with the flags and seed the
  study gives that run: the CLI test checks the run, the study test finishes the study
  around it, and the pair trains once for both. Returns (the folder, the CLI's result)."""
  from run_helpers import run_cli

  root = tmp_path_factory.mktemp(experiment)
  result = run_cli(f"--config=experiments/{experiment}.py:guided",
                   f"--workdir={root / 'study' / 'guided' / 'seed_0'}",
                   f"--config.data.data_dir={root / 'tfds'}", *flags, "--config.seed=0")
  return root / "study", result


@pytest.fixture(scope="session")
def nvgesture_study(tmp_path_factory):
  """The tiny NVGesture job's study around its CLI run (the I3D pair)."""
  from run_helpers import NVGESTURE_FLAGS

  return _study_around_a_cli_run(tmp_path_factory, "nvgesture", NVGESTURE_FLAGS)


@pytest.fixture(scope="session")
def modelnet40_study(tmp_path_factory):
  """The tiny ModelNet40 job's study around its CLI run (the ResNet-18 pair)."""
  from run_helpers import MODELNET40_FLAGS

  return _study_around_a_cli_run(tmp_path_factory, "modelnet40", MODELNET40_FLAGS)


def pytest_sessionfinish(session, exitstatus):
  """The cache goes with the session that made it (the xdist controller, or a plain run)."""
  del session, exitstatus
  if "PYTEST_XDIST_WORKER" not in os.environ:
    shutil.rmtree(_CACHE, ignore_errors=True)
