"""The library installs and imports light; the runner is an extra; the wheel holds the library
alone (the runner works from a clone)."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

from run_helpers import BLOCK_HEAVY, HEAVY, ROOT

CORE_REQUIREMENTS = {"jax", "flax", "optax", "numpy"}


def _python(code: str, cwd=ROOT) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                        timeout=300)


def test_wheel_holds_the_library_alone_and_requires_only_the_core(tmp_path):
  source = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      ".git", ".venv*", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                  "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist")],
                 cwd=source, check=True, capture_output=True, timeout=300)
  (wheel,) = (tmp_path / "dist").glob("gml_jax-*.whl")
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = z.read(metadata).decode()
  top_level = {n.split("/")[0] for n in names if ".dist-info/" not in n}
  assert top_level == {"gml_jax"}
  assert {"gml_jax/py.typed", "gml_jax/models/backbones/small_cnn.py",
          "gml_jax/parallel.py"} <= set(names)
  assert not [n for n in names if n.startswith("gml_jax/runner/")]  # from a clone only
  requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
              if line.startswith("Requires-Dist:")]
  core = {re.split(r"[<>=!; \[]", r)[0].lower() for r in requires if "extra ==" not in r}
  assert core == CORE_REQUIREMENTS
  extras = {line.split(":", 1)[1].strip() for line in meta.splitlines()
            if line.startswith("Provides-Extra:")}
  assert {"experiments", "dev"} <= extras
  for field in ("License: Apache-2.0", "Requires-Python: >=3.11", "Project-URL: Paper",
                "Classifier: Typing :: Typed"):
    assert field in meta


def _public_api_names() -> list[str]:
  """Every name of the API reference's "Public API" table (first column), as dotted paths."""
  section = ROOT.joinpath("docs", "api", "index.md").read_text().split("## Public API", 1)[1]
  rows = [line for line in section.split("\n## ", 1)[0].splitlines() if line.startswith("| `")]
  first_cells = [r.split(" | ")[0] for r in rows]
  return [re.match(r"[\w.]+", span).group(0)
          for cell in first_cells for span in re.findall(r"`([^`]+)`", cell)]


def test_import_loads_no_runner_dependency_and_every_public_name_resolves():
  names = _public_api_names()
  assert len(names) >= 25 and "balanced_multimodal" in names and "i3d_fusion" in names
  result = _python(textwrap.dedent(f"""
      import functools, sys
      import gml_jax
      for name in {names!r}:
        functools.reduce(getattr, name.split("."), gml_jax)
      loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
      print("loaded:", loaded)
      """), cwd=pathlib.Path("/"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "loaded: []"


def test_all_matches_the_readme_table():
  import gml_jax

  top_level = {n for n in _public_api_names() if "." not in n}
  assert top_level == set(gml_jax.__all__)
  assert len(gml_jax.__all__) == len(set(gml_jax.__all__))


def test_readme_linen_example_runs_with_the_heavy_modules_blocked():
  blocks = re.findall(r"```python\n(.*?)```", ROOT.joinpath("README.md").read_text(), flags=re.S)
  result = _python(BLOCK_HEAVY + blocks[0], cwd=pathlib.Path("/"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("[")  # the speeds it prints


def test_runner_without_the_extra_says_which_extra_to_install():
  result = _python(BLOCK_HEAVY + textwrap.dedent("""
      import runpy
      sys.argv = ["main", "--help"]
      runpy.run_module("gml_jax.runner.main", run_name="__main__")
      """))
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("ImportError: gml_jax.runner needs the 'experiments' extra")
  assert "pip install -e '.[experiments]'" in last and "tensorflow_datasets" in last


def test_runner_import_from_the_library_alone_says_where_the_runner_is(tmp_path):
  # The wheel's gml_jax: the package without gml_jax/runner (copied: no wheel build here).
  shutil.copytree(ROOT / "gml_jax", tmp_path / "gml_jax",
                  ignore=shutil.ignore_patterns("runner", "__pycache__"))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(tmp_path)}
  # Without the clone's editable-install finder, which would find the clone's runner.
  code = textwrap.dedent("""
      import sys
      sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", "")]
      import gml_jax.runner.main
      """)
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]  # a bare "No module named ..." before
  assert last.startswith("ModuleNotFoundError: gml_jax.runner is not installed: the wheel "
                         "holds the library alone"), last
  assert "pip install -e '.[experiments]'" in last
