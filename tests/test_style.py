"""The house's bounds that a linter does not state: no runner function over 50 code lines."""

import ast
import io
import pathlib
import tokenize

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_CODE_LINES = 50


def code_lines(source: str, node: ast.AST) -> int:
  """Lines of ``node`` that hold code: not blank, not only a comment, not its docstring."""
  lines = source.splitlines()[node.lineno - 1:node.end_lineno]
  docstring = ast.get_docstring(node, clean=False)
  skip = set()
  if docstring is not None:
    first = node.body[0]
    skip = set(range(first.lineno, first.end_lineno + 1))
  comments = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type == tokenize.COMMENT and source.splitlines()[t.start[0] - 1].strip()
              .startswith("#")}
  return sum(1 for i, line in enumerate(lines, node.lineno)
             if line.strip() and i not in skip and i not in comments)


def long_functions(path: pathlib.Path) -> list[str]:
  source = path.read_text()
  return [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} code lines)"
          for node in ast.walk(ast.parse(source))
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and (n := code_lines(source, node)) > MAX_CODE_LINES]


def test_counting_skips_docstrings_comments_and_blank_lines():
  source = 'def f():\n  """Doc\n  string."""\n  # why\n\n  x = 1  # kept\n  return x\n'
  assert code_lines(source, ast.parse(source).body[0]) == 3


def test_no_runner_function_is_over_50_code_lines():
  found = [f for path in sorted((ROOT / "gml_jax" / "runner").rglob("*.py"))
           for f in long_functions(path)]
  assert not found, found
