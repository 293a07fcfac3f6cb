"""Sphinx configuration of the documentation site (`make docs`; docs/README.md says how).

The site builds offline from this folder into docs/_build/html (ignored by git): MyST pages,
an API reference that autosummary generates from the docstrings (into docs/api/_generated,
ignored), the results pages generated from the studies' own files (docs/results/<study>/,
by docs/results_pages.py, into docs/results/_generated, ignored) and the datasets' READMEs
(data_prep/<name>/README.md). The build stops on any warning (`make docs` runs sphinx with
-W) and on a public name without a page (`check_every_public_name_has_a_page`).
"""

import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # this clone's gml_jax, not an installed one
sys.path.insert(0, str(DOCS))

import results_pages  # noqa: E402  (docs/results_pages.py, beside this file)

project = "gml_jax"
author = "gml_jax contributors"
copyright = "the gml_jax contributors, Apache-2.0"  # noqa: A001  (Sphinx's own name)

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "README.md", "results/*/study.md", "results/*/notes.md"]
templates_path = ["_templates"]

# MyST: $...$ maths, ::: fences, heading anchors for links such as page.md#section.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# The API reference: one page per public name, from its docstring.
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
add_module_names = False
nitpicky = False  # type hints name jax/flax/optax classes this site does not document

html_theme = "sphinx_book_theme"
html_title = "gml_jax"
html_theme_options = {"show_toc_level": 2, "use_download_button": False,
                      "use_fullscreen_button": False}
html_static_path = []
html_last_updated_fmt = None


def check_every_public_name_has_a_page(app, exception):
  """Fails the build when a name of gml_jax.__all__ has no generated API page."""
  if exception is not None or app.builder.name != "html":
    return
  import gml_jax

  out = pathlib.Path(app.outdir) / "api" / "_generated"
  missing = [n for n in gml_jax.__all__ if not (out / f"gml_jax.{n}.html").exists()]
  if missing:
    from sphinx.errors import ExtensionError
    raise ExtensionError(
      f"public names without an API page: {', '.join(missing)}; list each in an autosummary "
      "directive of docs/api/index.md")


def write_dataset_pages(docs: pathlib.Path) -> None:
  """One page per data_prep/<name>/README.md, in docs/datasets/_generated (ignored by git):
  a MyST include, so the README stays where the dataset's code is."""
  out = docs / "datasets" / "_generated"
  out.mkdir(exist_ok=True)
  pages = {}
  for readme in sorted((docs.parent / "data_prep").glob("*/README.md")):
    pages[out / f"{readme.parent.name}.md"] = (
      f"```{{include}} ../../../data_prep/{readme.parent.name}/README.md\n"
      ":relative-images:\n```\n")
  for page, text in pages.items():
    if not page.exists() or page.read_text() != text:
      page.write_text(text)
  for stale in set(out.glob("*.md")) - set(pages):
    stale.unlink()


def generate_pages(app):
  results_pages.write_all(DOCS)
  write_dataset_pages(DOCS)


def setup(app):
  app.connect("builder-inited", generate_pages)
  app.connect("build-finished", check_every_public_name_has_a_page)
