# gml_jax: `make demo` runs the main job, `make test` runs the tests. Both install first.
# `make train EXP=colored_mnist METHOD=guided` runs any experiment of experiments/.
#
# The virtual environment uses python3.12 when one runs here (it takes current JAX
# releases), else python3 (3.11 takes JAX 0.10.x); override with `make PYTHON=...`.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell for p in python3.12 $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 python3; do \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { echo $$p; break; }; done)
JAX_EXTRA ?=
TPU ?=
ZONE ?=
REMOTE_DIR ?= gml_jax
EXP ?= colored_mnist
METHOD ?= guided
WORKDIR ?= runs/$(EXP)_$(METHOD)
ARGS ?=

.PHONY: help install test train demo train-tpu train-slurm clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(VENV)/.installed  ## create $(VENV) and install gml_jax; JAX_EXTRA=tpu or cuda12 for accelerators

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -n "$(PYTHON)" || { echo "No Python >= 3.11 found; run make PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(if $(JAX_EXTRA),$(PY) -m pip install --quiet -U 'jax[$(JAX_EXTRA)]')
	@touch $@

test: install  ## run the test suite (CPU, 8 simulated devices, no network)
	$(PY) -m pytest

train: install  ## train experiments/$(EXP).py:$(METHOD) in $(WORKDIR); overrides: ARGS="--config.num_epochs=20"
	$(PY) -m gml_jax.main --config experiments/$(EXP).py:$(METHOD) --workdir $(WORKDIR) $(ARGS)

demo: install  ## the main job: guided Colored MNIST on the embedded MNIST subset, in runs/demo
	$(MAKE) --no-print-directory train EXP=colored_mnist METHOD=guided WORKDIR=runs/demo

train-tpu:  ## every worker of Cloud TPU VM $(TPU) in $(ZONE) runs `make train` with --distributed
	gcloud compute tpus tpu-vm ssh $(TPU) --zone=$(ZONE) --worker=all --command="cd $(REMOTE_DIR) && make train EXP=$(EXP) METHOD=$(METHOD) WORKDIR=$(WORKDIR) ARGS='--distributed $(ARGS)'"

train-slurm: install  ## inside a Slurm allocation: one process per node, all its GPUs, --distributed
	srun --ntasks-per-node=1 $(PY) -m gml_jax.main --config experiments/$(EXP).py:$(METHOD) --workdir $(WORKDIR) --distributed $(ARGS)

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) *.egg-info .pytest_cache  # runs/ is kept
