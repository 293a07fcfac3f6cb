"""gml_jax/runner/names.py is the one place that spells the runner's metric, summary and
study keys: every writer and reader goes through it, and nothing parses a key back."""

import ast
import re

import pytest
from run_helpers import ROOT

from gml_jax.runner import names

# A whole key as a string literal, or a key being assembled in an f-string, where a key is
# used: a subscript, a dict key, the key of .get/.pop/.setdefault, an `in` test.
WHOLE_KEY = re.compile(
    r"^((train|val|test|test_biased)_)?(branch_\d+_)?(accuracy|loss)$|^(test|test_biased)_examples$"
    r"|^(s|mu_main|mu_fusion|ogm_ratio|ogm_coefficient)_\d+$|^u\(m\d+\|m\d+\)$"
    r"|^rebalance_share_m\d+$|^(d_util|d_speed|samples_per_s|train_seconds|step|epoch|target)$")
KEY_PIECE = re.compile(r"branch_$|^_accuracy|^_loss|^s_$|^u\(m|rebalance_share|^ogm_(ratio|"
                       r"coefficient)_|^mu_(main|fusion)_|^(val|train|test)_$")


def _key_positions(tree):
  """The expressions of ``tree`` that are used as keys."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Subscript):
      yield node.slice
    elif isinstance(node, ast.Dict):
      yield from (k for k in node.keys if k is not None)
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr in ("get", "pop", "setdefault") and node.args):
      yield node.args[0]
    elif isinstance(node, ast.Compare) and any(isinstance(o, (ast.In, ast.NotIn))
                                                for o in node.ops):
      yield node.left


def _spelled_keys(path):
  for expr in _key_positions(ast.parse(path.read_text())):
    if isinstance(expr, ast.JoinedStr):
      pieces = [p.value for p in expr.values if isinstance(p, ast.Constant)]
      if any(KEY_PIECE.search(piece) for piece in pieces):
        yield expr.lineno, f"f-string {pieces!r}"
    elif isinstance(expr, ast.Constant) and isinstance(expr.value, str) and WHOLE_KEY.match(
        expr.value):
      yield expr.lineno, repr(expr.value)


def test_no_runner_module_spells_a_key_of_its_own():
  modules = sorted((ROOT / "gml_jax" / "runner").glob("*.py"))
  found = [f"{p.name}:{line}: {what}" for p in modules if p.name != "names.py"
           for line, what in _spelled_keys(p)]
  assert found == []


def test_the_scan_finds_a_key_spelled_by_hand(tmp_path):
  # The check above can fail: these are the shapes it looks for.
  path = tmp_path / "writer.py"
  path.write_text('"""Doc: test_accuracy."""\nrow = {"test_accuracy": 1}\n'
                  'a = row[f"branch_{m}_accuracy"]\nb = row.get(f"u(m{j}|m{k})")\n'
                  'c = "d_util" in row\nplt.ylabel("accuracy")\n')
  assert sorted(line for line, _ in _spelled_keys(path)) == [2, 3, 4, 5]


@pytest.mark.parametrize("modalities", [(0, 1), (1,), (0, 1, 2)])
def test_keys_are_distinct_and_name_the_modality(modalities):
  for keys in (names.step_keys(modalities), names.epoch_keys(modalities),
               names.summary_keys(modalities), names.study_metrics(modalities)):
    assert len(keys) == len(set(keys))
  assert names.split("test", names.branch_accuracy(2)) == "test_branch_2_accuracy"
  assert names.utilization(1, 0) == "u(m1|m0)"
  assert names.train(names.LOSS) == "train_loss"
