"""The README's Python examples run as written, one after another."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert len(blocks) == 2
  namespace = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)
  printed = capsys.readouterr().out.split("\n")
  assert printed[0].startswith("[") and printed[1].strip() in {"-1", "0", "1"}
