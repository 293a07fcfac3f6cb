r"""Builds (or checks) an experiment's dataset without training and without TensorFlow.

  python -m gml_jax.runner.prepare --config experiments/colored_mnist.py
  python -m gml_jax.runner.prepare --config experiments/modelnet40.py \
      --config.data.manual_dir=/data/modelnet40 --config.data.data_dir=/shared/tfds
  make data EXP=modelnet40 ARGS="--config.data.manual_dir=/data/modelnet40"

Prepares ``config.data`` exactly as a run would (into ``data.data_dir``, from
``data.manual_dir`` when given), checks that a prepared build was made from the data the
config names and that every split opens, and prints where it is, what it was built from,
the split sizes and its size on disk. Run it once before a multi-host launch so that no
host waits on a build.
"""

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from gml_jax.runner import dataset, failure, storage
from gml_jax.runner.workdir import describe_data

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/modelnet40.py; "
    "--config.data.<field>=<value> overrides as for a run.", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  logging.set_verbosity(logging.ERROR)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    data = dataset.open_dataset(_CONFIG.value.data)
  except Exception as e:  # noqa: BLE001 (the CLI's one failure path: one Error line)
    raise SystemExit(failure.fail(e, None, show_traceback=False)) from None
  used = data.used()
  where = data.builder.data_dir
  if storage.is_remote(_CONFIG.value.data.data_dir):  # the bucket's build, and this host's copy
    remote = dataset.bucket_version_dir(storage.path(_CONFIG.value.data.data_dir),
                                        pathlib.Path(where))
    where = f"{remote} (copy: {where})"
  print(f"{data.builder.name}/{data.builder.builder_config.name}: {where}")
  print(f"built from {describe_data(used)}")
  for split, count in used["examples"].items():
    print(f"  {split:12} {count:>8,} examples")
  size = sum(p.stat().st_size for p in pathlib.Path(data.builder.data_dir).rglob("*")
             if p.is_file())
  print(f"  {'on disk':12} {size / 1e6:>8,.1f} MB")


if __name__ == "__main__":
  app.run(main, flags_parser=failure.parse_flags)
