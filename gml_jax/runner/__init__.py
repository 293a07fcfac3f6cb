"""The experiment runner: the CLI (``python -m gml_jax.runner.main``), the trainer, the
input pipeline over the tfds builders of ``data_prep/``, the configs of ``experiments/``
and the plots.

Unlike the library, it needs the ``experiments`` extra (``pip install -e '.[experiments]'``
or ``make install``) and runs from a clone of the repository: ``experiments/`` and
``data_prep/`` live at its root, beside ``gml_jax/``; the wheel holds neither, nor the
runner itself. Its vocabulary (methods, variants, metric keys) is :mod:`.names`.
"""

import importlib.util

# The imports of the runner (and of the builders) beyond the library's.
EXTRA_MODULES = ("absl", "ml_collections", "orbax.checkpoint", "tensorflow_datasets",
                 "array_record", "grain", "tensorboardX", "matplotlib", "tqdm", "PIL")


def _missing(names) -> list[str]:
  missing = []
  for name in names:
    try:
      if importlib.util.find_spec(name) is None:
        missing.append(name)
    except ModuleNotFoundError:  # a parent package is missing
      missing.append(name)
  return missing


_MISSING = _missing(EXTRA_MODULES)
if _MISSING:
  raise ImportError(
      f"gml_jax.runner needs the 'experiments' extra (missing: {', '.join(_MISSING)}); "
      "install it from a clone with: pip install -e '.[experiments]'  (or: make install)")

# The configs and builders of the clone, registered by path (no sys.path edit).
from gml_jax.runner import clone  # noqa: E402

clone.register()
