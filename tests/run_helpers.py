"""Helpers for tests that run the Colored MNIST job on its dummy data."""

import atexit
import functools
import io
import json
import multiprocessing
import os
import pathlib
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments import colored_mnist

ROOT = pathlib.Path(__file__).resolve().parent.parent
DUMMY = ROOT / "data_prep" / "colored_mnist" / "dummy_data"
CONFIG = ROOT / "experiments" / "colored_mnist.py"


def build_dataset(builder_class, config, data_dir, manual_dir):
  """Builds a data_prep builder (array_record, no TensorFlow) into ``data_dir``."""
  import tensorflow_datasets as tfds

  builder = builder_class(config=config, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def tiny_config(method, data_dir):
  """5 steps per epoch (189 train digits, batch 32), 2 epochs, a 4-channel CNN. Without the
  validation rates at every epoch end (10–25% of a tiny run's time): the tests of those turn
  them on."""
  c = colored_mnist.get_config(method)
  c.data.data_dir, c.data.manual_dir = str(data_dir), str(DUMMY)
  c.model.small_cnn.width, c.batch_size, c.eval_batch_size = 4, 32, 64
  c.num_epochs, c.log_every_steps, c.utilization_every_epoch = 2, 2, False
  return c


def tiny_flags(data_dir, **overrides):
  """tiny_config's fields as CLI flags, and ``overrides`` (``a__b=v`` sets ``a.b``)."""
  fields = {"data.data_dir": data_dir, "data.manual_dir": DUMMY, "model.small_cnn.width": 4,
            "batch_size": 32, "eval_batch_size": 64, "num_epochs": 2, "log_every_steps": 2,
            "utilization_every_epoch": False}
  fields |= {k.replace("__", "."): v for k, v in overrides.items()}
  return [f"--config.{k}={v}" for k, v in fields.items()]


# The tiny NVGesture job (8 frames of 32x32, I3D of width 8 with one Inception module a
# stage): the suite's slowest model.
NVGESTURE_DUMMY = ROOT / "data_prep" / "nvgesture" / "dummy_data"
NVGESTURE_FLAGS = ["--config.data.builder_config=frames8_32px", "--config.model.i3d.width=8",
                   "--config.model.i3d.max_blocks=1",
                   "--config.batch_size=4", "--config.eval_batch_size=4",
                   "--config.num_epochs=2", "--config.log_every_steps=1",
                   f"--config.data.manual_dir={NVGESTURE_DUMMY}"]


# The tiny ModelNet40 job (two 32x32 views, ResNet-18 of width 8 with one block a layer; 12
# training objects, batch 4: 3 steps an epoch, one step a call), with the authors' plateau
# schedule made to act: every epoch after the first is a plateau (threshold 0.99, patience 0).
MODELNET40_DUMMY = ROOT / "data_prep" / "modelnet40_views" / "dummy_data"
MODELNET40_FLAGS = ["--config.data.image_size=32", "--config.model.resnet18.width=8",
                    "--config.model.resnet18.max_blocks=1",
                    "--config.batch_size=4", "--config.eval_batch_size=4",
                    "--config.num_epochs=3", "--config.log_every_steps=1",
                    "--config.steps_per_call=1", "--config.schedule.patience=0",
                    "--config.schedule.threshold=0.99",
                    f"--config.data.manual_dir={MODELNET40_DUMMY}"]


# The xdist group of the tests that compare a two-process job with conftest's one_process_run.
ONE_PROCESS_RUN = "one_process_run"


MAIN = "gml_jax.runner.main"  # the CLI, for run_module and start_module


def cli_args(method, workdir, data_dir, *extra, **overrides):
  """The command line of a tiny Colored MNIST run of ``method`` (after ``-m MAIN``)."""
  return [f"--config={CONFIG}:{method}", f"--workdir={workdir}",
          *tiny_flags(data_dir, **overrides), *extra]


def cli_env(devices=1):
  """The environment of a run the tests start: ``devices`` simulated CPU devices, the tests'
  XLA flags and compilation cache (tests/conftest.py)."""
  flags = os.environ.get("GML_JAX_TEST_XLA_FLAGS", "")
  return os.environ | {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}"}


def run_cli(*args, **options):
  """The CLI (MAIN) with ``args``, waited for: run_module's options and result."""
  return run_module(MAIN, *args, **options)


# --------------------------------------------------------------------------------------
# Runs and studies forked from a warm interpreter
#
# A fresh `python -m gml_jax.runner.main` spends about 5 CPU-s importing JAX, Flax, orbax,
# grain, tensorflow-datasets, matplotlib and tensorboardX: half of a tiny run, and most of a
# study's own process. The tests start those commands as forks of one interpreter per test
# worker that has imported them (multiprocessing's fork server; nothing there has started
# JAX's backend or a thread), each fork then running the module as `python -m` does, with
# its own environment, working directory, argv and output files (the runner reads its
# environment variables when it uses them, not at import). What the tests check of a fresh
# interpreter runs fresh processes: the imports and the wheel (tests/test_packaging.py), the
# one-line errors of a bad command line (tests/test_faults.py), the device report with the
# runner's modules blocked, the examples as written, and every run a study starts.

_PRELOAD = ["gml_jax.runner.trainer", "gml_jax.runner.study_report", "tensorflow_datasets",
            "tensorboardX", "absl.app", "ml_collections.config_flags"]


@functools.cache
def _fork_server():
  context = multiprocessing.get_context("forkserver")
  context.set_forkserver_preload(_PRELOAD)
  return context


@functools.cache
def _fresh_sys_path() -> tuple[str, ...]:
  """sys.path of a fresh interpreter, less its first entry (the working directory)."""
  code = "import json, sys; print(json.dumps(sys.path[1:]))"
  return tuple(json.loads(subprocess.check_output([sys.executable, "-c", code], text=True)))


def _as_python_m(module, args, cwd, env, out, err, sys_path):
  """In the fork: becomes `cd cwd; env python -m module args > out 2> err`."""
  signal.signal(signal.SIGINT, signal.default_int_handler)
  for sig in (signal.SIGTERM, signal.SIGCHLD):
    signal.signal(sig, signal.SIG_DFL)
  os.chdir(cwd)
  os.environ.clear()
  os.environ.update(env)
  for fd, path in ((1, out), (2, err)):
    opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(opened, fd)
    os.close(opened)
  sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False),
                                             encoding="utf-8", line_buffering=True)
                            for fd in (1, 2))
  sys.path[:] = [str(cwd), *sys_path]
  sys.argv = [module, *args]
  code = 0
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    if isinstance(e.code, (int, type(None))):
      code = e.code or 0
    else:  # a message: printed, status 1, as Python does
      print(e.code, file=sys.stderr)
      code = 1
  except BaseException:  # noqa: BLE001 (an uncaught error: a traceback and status 1)
    traceback.print_exc()
    code = 1
  atexit._run_exitfuncs()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


class Forked:
  """A command forked from the warm interpreter, with subprocess.Popen's interface (pid,
  returncode, poll, wait, send_signal, kill, communicate) and its output as text."""

  def __init__(self, module, args, cwd, env):
    self.args = [module, *args]
    folder = pathlib.Path(tempfile.mkdtemp(prefix="gml_jax_forked_"))
    self._out, self._err, self._output = folder / "stdout", folder / "stderr", None
    self._process = _fork_server().Process(
        target=_as_python_m,
        args=(module, list(args), str(cwd), dict(env), self._out, self._err, _fresh_sys_path()),
        daemon=True)  # ended with the test worker, as a test's own Popen would not be
    self._process.start()
    self.pid = self._process.pid

  @property
  def returncode(self):
    return self._process.exitcode

  def poll(self):
    if self.returncode is not None:
      self._collect()
    return self.returncode

  def wait(self, timeout=None):
    self._process.join(timeout)
    if self.poll() is None:
      raise subprocess.TimeoutExpired(self.args, timeout)
    return self.returncode

  def output_so_far(self) -> str:
    """What it has written to its standard output so far."""
    return self._out.read_text(errors="replace") if self._output is None else self._output[0]

  def _collect(self):
    """Once it has ended: its output read, its folder removed."""
    if self._output is None:
      self._output = tuple(f.read_text(errors="replace") for f in (self._out, self._err))
      shutil.rmtree(self._out.parent)

  def send_signal(self, sig):
    os.kill(self.pid, sig)

  def kill(self):
    self.send_signal(signal.SIGKILL)

  def communicate(self, timeout=None):
    self.wait(timeout)
    return self._output


def start_module(module, *args, devices=1, env=None, cwd=ROOT) -> Forked:
  """`python -m module args` in ``cwd``, on ``devices`` simulated devices (cli_env),
  forked from the warm interpreter; ``env`` adds to the environment."""
  return Forked(module, args, cwd, cli_env(devices) | (env or {}))


def run_module(module, *args, devices=1, env=None, cwd=ROOT, timeout=300):
  """start_module, waited for: a subprocess.CompletedProcess."""
  proc = start_module(module, *args, devices=devices, env=env, cwd=cwd)
  out, err = proc.communicate(timeout)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read_jsonl(path) -> list[dict]:
  """The rows of a JSON-lines file, local or on gs:// ([] when there is none)."""
  from gml_jax.runner import storage

  path = storage.path(path)
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def step_rows(workdir):
  return read_jsonl(pathlib.Path(workdir) / "metrics" / "steps.jsonl")


def epoch_rows(workdir):
  return read_jsonl(pathlib.Path(workdir) / "metrics" / "epochs.jsonl")


def restore_latest(workdir):
  """(step, state as a tree of numpy arrays) of a run's latest checkpoint, whatever
  devices or processes saved it."""
  step = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints" / "latest").latest_step()
  path = pathlib.Path(workdir) / "checkpoints" / "latest" / str(step) / "state"
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata)
  return step, jax.tree.map(np.asarray, checkpointer.restore(path, target))


def assert_states_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


# What only the runner may load (the experiments extra), never `import gml_jax`.
HEAVY = ("tensorflow_datasets", "grain", "orbax", "matplotlib", "cv2", "tensorboardX",
         "mlxtend", "ml_collections", "tensorflow")

# A meta-path finder that makes the heavy modules look uninstalled.
BLOCK_HEAVY = textwrap.dedent(f"""
    import sys

    class BlockHeavy:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
          raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None

    sys.meta_path.insert(0, BlockHeavy())
    """)
