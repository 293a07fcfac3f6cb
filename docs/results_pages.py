"""The results pages of the site, generated from the studies' own files.

Each study that the documentation reports keeps its own files in docs/results/<study>/:
``study.md`` (the tables ``python -m gml_jax.runner.study`` wrote), its plots (``*.png``)
and ``notes.md`` (by hand: what was run, on what, and what it says; its first line is the
page's title). Its page, docs/results/_generated/<study>.md (ignored by git, rewritten by
every build), is the notes, then the study's tables, then every figure of the folder, each
once. Numbers are stated in ``study.md`` alone; other pages link to the results page.

A study's command line names its workdir as it was given; an absolute one (a machine's
local path) is written as ``runs/<its last component>`` and no generated page may hold an
absolute local path (the build stops, naming the page).
"""

import pathlib
import re

GENERATED = "_generated"
# Captions of the figures that study_report.plots writes, by file name (others: the name).
CAPTIONS = {
  "accuracy.png": "Test accuracy per method (mean ± std over seeds; dots: seeds)",
  "speeds.png": "Conditional learning speeds s₀, s₁ and d_speed over training (band over "
                "seeds) and the share of seeds re-balancing each modality",
  "validation.png": "Validation accuracy per branch and epoch",
  "utilization.png": "Conditional utilization rates (mean ± std over seeds; dots: seeds)",
  "speed_vs_utilization.png": "d_speed against the validation d_util at every epoch end, "
                              "per run",
  "grid.png": "Test ŷ and the re-balancing shares against the first numeric grid axis",
}
_ABSOLUTE_WORKDIR = re.compile(r"--workdir[ =](/[^\s`]*)")
# A path that starts at a file system's root, as a token (not inside a URL).
_ABSOLUTE_PATH = re.compile(r"(?:^|[\s`(\"'=])(/(?:[\w.-]+/)+[\w.-]*)")


def relative_workdir(text: str) -> str:
  """``text`` with every absolute ``--workdir`` written as ``runs/<last component>``."""
  return _ABSOLUTE_WORKDIR.sub(
    lambda m: "--workdir runs/" + pathlib.PurePosixPath(m.group(1)).name, text)


def absolute_paths(text: str) -> list[str]:
  """The absolute local paths that ``text`` holds (none in a generated page)."""
  return _ABSOLUTE_PATH.findall(text)


def study_page(folder: pathlib.Path) -> str:
  """The page of the study in ``folder``: its notes, its tables, its figures (each once).

  Needs ``notes.md`` (titled by its first line, ``# ...``) and ``study.md`` in ``folder``."""
  notes_file, study_file = folder / "notes.md", folder / "study.md"
  for needed in (notes_file, study_file):
    if not needed.is_file():
      raise FileNotFoundError(f"{needed}: a results folder needs notes.md and study.md")
  notes = notes_file.read_text().rstrip()
  if not notes.startswith("# "):
    raise ValueError(f"{notes_file}: the first line must be the page's title, '# ...'")
  tables = study_file.read_text().split("\n", 1)[1]  # without "# Study: <experiment>"
  tables = re.sub(r"^(#+) ", r"#\1 ", tables, flags=re.M)  # under "## Tables"
  figures = sorted(folder.glob("*.png"), key=lambda p: (p.name not in CAPTIONS, p.name))
  parts = [notes, "", "## Tables", "",
           f"Generated from the study's own file, `docs/results/{folder.name}/study.md`: "
           "mean ± std over seeds per method (and grid point), then the paired differences "
           "with a 95% Student-t interval and their per-seed values.", "",
           relative_workdir(tables).strip()]
  if figures:
    parts += ["", "## Figures", ""]
    for figure in figures:
      caption = CAPTIONS.get(figure.name, figure.stem)
      parts += [f"({folder.name}-{figure.stem})=", f"### {caption}", "",
                f"![{caption}](../{folder.name}/{figure.name})", ""]
  return "\n".join(parts).rstrip() + "\n"


def write_all(docs: pathlib.Path) -> list[pathlib.Path]:
  """Writes the page of every docs/results/<study>/ into docs/results/_generated/.

  Stale pages (a study folder removed) are deleted; a page with an absolute local path
  stops the build."""
  results = docs / "results"
  out = results / GENERATED
  out.mkdir(exist_ok=True)
  folders = sorted(p for p in results.iterdir() if p.is_dir() and p.name != GENERATED
                   and (p / "study.md").exists())
  written = []
  for folder in folders:
    page = study_page(folder)
    found = absolute_paths(page)
    if found:
      raise ValueError(f"the results page of {folder.name} holds absolute local paths: "
                       f"{found}; write them relative to the clone")
    target = out / f"{folder.name}.md"
    if not target.exists() or target.read_text() != page:  # unchanged: Sphinx skips it
      target.write_text(page)
    written.append(target)
  for stale in set(out.glob("*.md")) - set(written):
    stale.unlink()
  return written
