"""The README's Python examples run as written, one after another."""

import ast
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert len(blocks) == 2
  namespace = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)
  speeds, utilization, nnx_line = capsys.readouterr().out.strip().split("\n")
  # Linen FiLM through the library's steps: two speeds and the last step's target.
  assert speeds.startswith("[") and speeds.split()[-1] in {"-1", "0", "1"}
  rates = ast.literal_eval(utilization)
  assert {"accuracy", "branch_0_accuracy", "u(m1|m0)", "u(m0|m1)", "d_util"} <= set(rates)
  assert 0 <= rates["accuracy"] <= 1
  # NNX: 60 steps taken, and the trained model back as an nnx.Module.
  assert nnx_line == "60 (16, 3)"
