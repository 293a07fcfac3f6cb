"""Helpers for tests that run the Colored MNIST job on its dummy data."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

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


# The tiny NVGesture job (8 frames of 32x32, I3D of width 8): the suite's slowest model.
NVGESTURE_DUMMY = ROOT / "data_prep" / "nvgesture" / "dummy_data"
NVGESTURE_FLAGS = ["--config.data.builder_config=frames8_32px", "--config.model.i3d.width=8",
                   "--config.batch_size=4", "--config.eval_batch_size=4",
                   "--config.num_epochs=2", "--config.log_every_steps=1",
                   f"--config.data.manual_dir={NVGESTURE_DUMMY}"]


def cli_command(method, workdir, data_dir, *extra, **overrides):
  return [sys.executable, "-m", "gml_jax.runner.main", f"--config={CONFIG}:{method}",
          f"--workdir={workdir}", *tiny_flags(data_dir, **overrides), *extra]


def cli_env(devices=1):
  """The environment of a run the tests start: ``devices`` simulated CPU devices, the tests'
  XLA flags and compilation cache (tests/conftest.py)."""
  flags = os.environ.get("GML_JAX_TEST_XLA_FLAGS", "")
  return os.environ | {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}"}


def run_cli(*args, devices=1, timeout=300):
  return subprocess.run([sys.executable, "-m", "gml_jax.runner.main", *args], cwd=ROOT,
                        env=cli_env(devices), capture_output=True, text=True, timeout=timeout)


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
