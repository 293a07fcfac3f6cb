"""The clone the runner runs from: the configs of ``experiments/`` and the dataset builders of
``data_prep/`` at its root, beside ``gml_jax/``.

Neither is part of the wheel, and the runner works from a clone only. Instead of putting the
root on ``sys.path`` (which would make every top-level folder of the clone importable, and
shadow installed packages of the same names), the two packages are registered by their path
(:func:`register`), so that ``experiments.common`` and ``data_prep.<name>`` import as
themselves from wherever the runner is started.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("experiments", "data_prep")


def register() -> None:
  """Imports the clone's ``experiments`` and ``data_prep`` packages from their folders."""
  for name in PACKAGES:
    folder = ROOT / name
    if not (folder / "__init__.py").is_file():
      raise ImportError(
          f"gml_jax.runner runs from a clone of the repository: it reads experiments/ and "
          f"data_prep/ beside gml_jax/, and {ROOT} has no {name}/. Clone it and "
          "pip install -e '.[experiments]' there.")
    if name in sys.modules:
      continue
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def datasets() -> tuple[str, ...]:
  """The datasets there are: one builder package ``data_prep/<name>/`` each."""
  return tuple(sorted(p.parent.name for p in (ROOT / "data_prep").glob("*/__init__.py")))


def dataset_package(name: str) -> ModuleType:
  """``data_prep/<name>/``: its tfds ``Builder``, ``check_manual_dir`` and ``MODALITIES``
  (the feature of each modality, in modality order)."""
  if name not in datasets():
    raise ValueError(f"Unknown dataset {name!r}: expected a builder package "
                     f"data_prep/{name}/ (known: {list(datasets())}).")
  register()
  return importlib.import_module(f"data_prep.{name}")


def dataset_modalities(name: str) -> tuple[str, ...]:
  """The features of dataset ``name``'s modalities, as its package declares them."""
  return tuple(dataset_package(name).MODALITIES)
