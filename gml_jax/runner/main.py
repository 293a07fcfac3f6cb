r"""Trains and evaluates one experiment config.

  python -m gml_jax.runner.main --config experiments/colored_mnist.py:guided \
      --workdir runs/cm_guided
  python -m gml_jax.runner.main --config experiments/colored_mnist.py:vanilla --workdir runs/cm_v \
      --config.num_epochs=20 --config.balance.guided.update_mode=all

--config is a Python file with get_config(variant); every field can be overridden with
--config.<field>=<value> (an unknown field is an error); the fields, their defaults and
meanings are in the config file, and --print_config shows the resolved config. Running again
with the same --workdir resumes the run from its latest checkpoint. See
gml_jax/runner/trainer.py for what a run writes. Run it from a clone of the repository
(it reads experiments/ and data_prep/), with the ``experiments`` extra installed.
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from gml_jax.runner import dataset, failure, names, storage, trainer
from gml_jax.runner import workdir as workdir_lib
from gml_jax.runner.evaluation import format_summary

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: path/to/config.py[:variant], e.g. "
    f"experiments/colored_mnist.py:guided (variants: {', '.join(names.VARIANTS)}; a method's "
    "options are balance.<method>.<option>, e.g. --config.balance.guided.alpha=0.05).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the run's config, metrics, checkpoints, summary and "
    "plots; an existing one of the same config is resumed.")
_STOP_AFTER_STEPS = flags.DEFINE_integer(
    "stop_after_steps", None, "Checkpoint and stop once this many steps are done (the run "
    "resumes from there when started again).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Run as one process of a multi-process job (jax.distributed): "
    "automatic on Cloud TPU VMs and under Slurm; elsewhere also give --coordinator_address, "
    "--num_processes and --process_id.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for --distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes, for --distributed.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, for --distributed.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100, "For --distributed: how long the job waits for a "
    "process that stopped answering (killed, its host lost) before every process fails, "
    "so that the job can be restarted from its last checkpoint (JAX's default: 100).")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (with overrides) and exit.")
flags.mark_flags_as_required(["config"])


def main(argv):
  logging.set_verbosity(logging.ERROR)  # keep tfds/orbax log lines off the console
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _PRINT_CONFIG.value:
    print(_CONFIG.value)
    return
  workdir = _WORKDIR.value
  if not workdir:
    raise app.UsageError("--workdir is required (where the run is written or resumed).")
  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               heartbeat_timeout_seconds=_HEARTBEAT.value)
  try:
    summary = trainer.train_and_evaluate(_CONFIG.value, workdir, _STOP_AFTER_STEPS.value)
  except Exception as e:  # noqa: BLE001 (the CLI's one failure path: one Error line)
    # The background threads of a failed checkpoint read (orbax, tensorstore) go on
    # printing tracebacks for a while: from here on theirs go nowhere, so that the one line
    # that says what happened stays last, and the run leaves at once.
    console, sys.stderr = sys.stderr, open(os.devnull, "w", encoding="utf-8")
    status = fail(e, workdir, console)
    sys.stdout.flush()
    console.flush()
    os._exit(status)  # no interpreter cleanup: library threads would print past the line
  if summary is not None and jax.process_index() == 0:
    print("\n" + format_summary(summary))
    print(f"\nSummary: {workdir}/summary.json   plots: {workdir}/plots/   "
          f"TensorBoard: tensorboard --logdir {workdir}/tensorboard")
  if storage.retried():
    # Orbax's threads of a save that failed before its retry succeeded wait (10 min) for
    # signals that never come, and the interpreter would wait for them: the run is done
    # and saved, so the process ends here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Errors that carry their own explanation: their message is all the console shows.
EXPLAINED = (ValueError, OSError, FloatingPointError, dataset.DatasetCorruptError,
             dataset.DatasetIncompleteError, workdir_lib.WorkdirInUseError)


def fail(error: Exception, workdir: str, console=None) -> int:
  """Ends a failed run: the full traceback into ``<workdir>/error.log`` (when the workdir
  exists and the log can be written; never into a workdir the run was refused, another
  run's or a finished one's), the one-line reason last on the ``console`` (default:
  standard error); returns the exit status."""
  suffix = "" if jax.process_index() == 0 else f".{jax.process_index()}"
  # Not into a workdir refused, nor onto a bucket that cannot be reached.
  log_dir = None if workdir_lib.left_as_is(error) or isinstance(
      error, storage.StorageUnavailableError) else workdir
  return failure.fail(error, log_dir, f"error{suffix}.log", EXPLAINED, stream=console)


if __name__ == "__main__":
  app.run(main, flags_parser=failure.parse_flags)
