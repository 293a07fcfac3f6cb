"""The multi-host make targets expand to the documented commands (dry run: nothing runs)."""

import os
import subprocess

from run_helpers import ROOT


def _dry_run(target, *args):
  """The command that ``make target`` runs, printed by ``make -n`` (which runs nothing)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}  # under make test
  out = subprocess.run(["make", "-n", "--no-print-directory", target, *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, check=True).stdout
  (line,) = [line for line in out.splitlines() if line.startswith(("gcloud", "srun"))]
  return line


def test_train_tpu_runs_make_train_distributed_on_every_worker():
  line = _dry_run("train-tpu", "TPU=my-tpu", "ZONE=us-central2-b", "METHOD=vanilla",
                  "WORKDIR=/mnt/w", "ARGS=--config.num_epochs=3")
  assert line.startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all")
  assert ("make train EXP=colored_mnist METHOD=vanilla WORKDIR=/mnt/w "
          "ARGS='--distributed --config.num_epochs=3'") in line


def test_train_slurm_runs_one_distributed_process_per_node():
  line = _dry_run("train-slurm", "METHOD=guided", "WORKDIR=/shared/w")
  assert line.startswith("srun --ntasks-per-node=1 env XLA_FLAGS=")
  assert (".venv/bin/python -m gml_jax.runner.main --config experiments/colored_mnist.py:guided "
          "--workdir /shared/w --distributed") in line
  # The Makefile names no variant of its own: without METHOD, the config's default variant.
  line = _dry_run("train-slurm", "WORKDIR=/shared/w")
  assert (".venv/bin/python -m gml_jax.runner.main --config experiments/colored_mnist.py "
          "--workdir /shared/w --distributed") in line
