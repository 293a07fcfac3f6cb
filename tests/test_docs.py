"""The README's and the documentation site's Python blocks run as written (one namespace per
page, blocks in order); the README's results are its study's cells; the results pages hold
each figure once and no absolute local path; the shell blocks name real make targets and
modules. (The site itself is built by `make docs`, in .ci/run.)"""

import ast
import pathlib
import re
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GENERATED = "_generated"
sys.path.insert(0, str(DOCS))
import results_pages  # noqa: E402  (docs/results_pages.py)


def _blocks(page: pathlib.Path, lang: str = "python") -> list[str]:
  return re.findall(rf"```{lang}\n(.*?)```", page.read_text(), flags=re.S)


def _pages() -> list[pathlib.Path]:
  """Every hand-written page of the site (the generated ones come from these)."""
  return sorted(p for p in DOCS.rglob("*.md") if GENERATED not in p.parts
                and "_build" not in p.parts)


def _run(page: pathlib.Path) -> dict:
  """Runs the page's Python blocks in order in one namespace, and returns it."""
  namespace = {}
  for block in _blocks(page):
    exec(compile(block, str(page), "exec"), namespace)
  return namespace


def _float64(tree: dict) -> dict:
  """A nested dict of arrays as one of float64 NumPy arrays."""
  return {k: _float64(v) if isinstance(v, dict) else np.asarray(v, np.float64)
          for k, v in tree.items()}


def _features(params: dict, inputs: tuple) -> list:
  """tanh(x_k W_k + b_k) of each ``encoder_k``, in NumPy (the methods pages' tiny models)."""
  layers = [{n: np.asarray(v) for n, v in params[f"encoder_{k}"].items()} for k in (0, 1)]
  return [np.tanh(np.asarray(x) @ w["kernel"] + w["bias"]) for x, w in zip(inputs, layers)]


def test_readme_example_runs(capsys):
  (block,) = _blocks(ROOT / "README.md")
  exec(compile(block, "README.md", "exec"), {})
  speeds = capsys.readouterr().out.strip()
  assert speeds.startswith("[") and speeds.split()[-1] in {"-1", "0", "1"}


def test_own_model_tutorial_runs(capsys):
  page = DOCS / "tutorials" / "own_model.md"
  assert len(_blocks(page)) == 2
  _run(page)
  speeds, utilization, nnx_line = capsys.readouterr().out.strip().split("\n")
  # Linen FiLM through the library's steps: two speeds and the last step's target.
  assert speeds.startswith("[") and speeds.split()[-1] in {"-1", "0", "1"}
  rates = ast.literal_eval(utilization)
  assert {"accuracy", "branch_0_accuracy", "u(m1|m0)", "u(m0|m1)", "d_util"} <= set(rates)
  assert 0 <= rates["accuracy"] <= 1
  # NNX: 60 steps taken, and the trained model back as an nnx.Module.
  assert nnx_line == "60 (16, 3)"


def test_handwritten_step_tutorial_freezes_what_it_says(capsys):
  _run(DOCS / "tutorials" / "handwritten_step.md")
  # warm-up, the schedule's normal step, then m0 re-balanced: branch 0's own params move,
  # the fusion layers, branch 1 and the cuts' running means stay bit-identical.
  assert capsys.readouterr().out.strip() == "[-1, -1, 0] ['encoder_0', 'head_0'] []"


def test_ogm_ge_page_damps_the_leading_branch(capsys):
  _run(DOCS / "methods" / "ogm_ge.md")
  # By hand: true-class scores softmax([4, 0])[0] = e^4 / (e^4 + 1) and 1/2; ρ_0 = their
  # ratio > 1, so branch 0's SGD(1) update -1 is scaled by 1 - tanh(0.8 ρ_0); branch 1's not.
  import numpy as np
  rho = (np.exp(4) / (np.exp(4) + 1)) / 0.5
  expected = {"branch_0": round(-(1 - float(np.tanh(0.8 * rho))), 3), "branch_1": -1.0}
  assert capsys.readouterr().out.strip() == str(expected)


def test_agm_page_coefficients_follow_its_mono_losses(capsys):
  page = DOCS / "methods" / "agm.md"
  assert len(_blocks(page)) == 2
  _run(page)
  mono, coefficients, nnx_line = capsys.readouterr().out.strip().split("\n")
  s, printed = np.array(ast.literal_eval(mono)), np.array(ast.literal_eval(coefficients))
  assert s.shape == printed.shape == (5, 2)
  # By the page's formulas, two modalities, α = 1.5, cap 10: r_k = exp(s_other - s_k), r̄_k
  # the same of the running means of the earlier steps (0 at the first: r̄ = 1).
  means, expected = np.zeros(2), []
  for t, losses in enumerate(s, start=1):
    ratios, targets = np.exp(losses[::-1] - losses), np.exp(means[::-1] - means)
    expected.append(np.exp(1.5 * np.minimum(targets - ratios, 10.0)))
    means = means * (t - 1) / t + losses / t
  np.testing.assert_allclose(printed, np.array(expected), atol=2e-3)  # s printed to 1e-4
  lead = int(np.argmin(s[0]))  # first step: the modality with the lower loss is slowed
  assert printed[0, lead] < 1 < printed[0, 1 - lead]
  # NNX: the hand-written step's mono losses and parameters are the library step's.
  assert nnx_line == "True 0.0"


def test_mmpareto_page_update_is_the_combined_gradient(capsys):
  page = DOCS / "methods" / "mmpareto.md"
  assert len(_blocks(page)) == 2
  ns = _run(page)
  linen_line, nnx_line = capsys.readouterr().out.strip().split("\n")
  from flax import nnx
  cosines, weights = ast.literal_eval(linen_line.replace("] [", "], ["))
  assert all(w == 0.5 for c, w in zip(cosines, weights) if c > 0)  # agreeing: the average
  printed_weights, difference = nnx_line.rsplit(" ", 1)
  assert difference == "0.0"  # the hand-written NNX step is the library's step
  # The hand-written step's SGD(0.05) update, recomputed with NumPy from its per-loss
  # gradients: per encoder k, w_k (½ if ⟨g_m, g_k⟩ > 0, else the two-task min-norm weight),
  # c = 2 (w_k g_m + (1 - w_k) g_k) per leaf, enlarged to the summed gradient's norm, × γ.
  grads = _float64(nnx.to_pure_dict(ns["loss_grads"]))
  before, after = (_float64(ns[name]) for name in ("before", "after"))
  expected_weights = []
  for k in range(2):
    g = grads[f"encoder_{k}"]
    v11, v12, v22 = (sum(float(np.vdot(g[n][i], g[n][j])) for n in g)
                     for i, j in ((0, 0), (0, 1 + k), (1 + k, 1 + k)))
    w = 0.5 if v12 > 0 else float(np.clip((v22 - v12) / (v11 + v22 - 2 * v12), 0.001, 0.999))
    expected_weights.append(w)
    for n, leaf in g.items():
      c = 2 * (w * leaf[0] + (1 - w) * leaf[1 + k])
      c = 1.5 * c * max(1.0, np.linalg.norm(leaf.sum(0)) / np.linalg.norm(c))
      np.testing.assert_allclose(after[f"encoder_{k}"][n], before[f"encoder_{k}"][n] - 0.05 * c,
                                 rtol=1e-5, atol=1e-6)
    for n, leaf in grads[f"head_{k}"].items():  # heads ("other"): the summed gradient
      np.testing.assert_allclose(after[f"head_{k}"][n],
                                 before[f"head_{k}"][n] - 0.05 * leaf.sum(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ast.literal_eval(printed_weights), expected_weights, atol=1e-4)


def test_pmr_page_prototypes_are_class_means_and_the_slow_modality_gets_the_term(capsys):
  ns = _run(DOCS / "methods" / "pmr.md")
  ratios, same, nnx_coefficients = capsys.readouterr().out.strip().split("\n")
  # Two modalities: rho_0 = s_0 / s_1 = 1 / rho_1; alpha = 1 for the one below 1, 0 else.
  rho = [float(v) for v in re.findall(r"[\d.]+", ratios.split("]")[0])]
  coefficients = [float(v) for v in re.findall(r"[\d.]+", ratios.split("]")[1])]
  assert abs(rho[0] * rho[1] - 1) < 0.01 and rho[0] != rho[1]
  assert coefficients == [float(r < 1) for r in rho]
  assert same == "True"  # the hand-written step's update is the library step's
  assert sorted(ast.literal_eval(nnx_coefficients.replace(". ", ", ").replace(".]", "]"))) == [
      0, 1]
  # Both models' prototypes: the class means of their sown features over the pass, by NumPy.
  epochs, pmr, batches = ns["epochs"], ns["pmr"], ns["train_batches"][:2]
  for state, step in ((ns["state"], ns["proto_step"]), (ns["nnx_state"], ns["nnx_proto_step"])):
    sums = pmr.prototype_pass(step, state.variables, batches)
    prototypes = pmr.pmr_state(epochs.epoch_start(state.opt_state, prototype_sums=sums)).prototypes
    label = np.concatenate([b["label"] for b in batches])
    parts = [_features(state.params, b["inputs"]) for b in batches]
    for k in (0, 1):
      f = np.concatenate([p[k] for p in parts])
      means = [f[label == c].mean(axis=0) for c in range(ns["CLASSES"])]
      np.testing.assert_allclose(prototypes[k], means, rtol=1e-4, atol=1e-6)


def test_inforeg_page_pulls_the_leader_toward_the_epoch_start(capsys):
  ns = _run(DOCS / "methods" / "inforeg.md")
  *epoch_lines, hand = capsys.readouterr().out.strip().split("\n")
  assert [line.split()[0] for line in epoch_lines] == ["0", "1", "2"]
  for line in epoch_lines:
    window, beta = [[float(v) for v in re.findall(r"[\d.]+", part)]
                    for part in line.split(" ", 1)[1].split("] [")]
    assert all(b == 0 for w, b in zip(window, beta) if w == 0)  # a closed window: no pull
    assert sum(b > 0 for b in beta) <= 1  # only the leader is pulled
  assert epoch_lines[0].split("]")[0].endswith("[1. 1.")  # epoch 0: open (r = 1)
  assert epoch_lines[1].split("]")[0].endswith("[1. 1.")  # history=1: T(-1) = 0, r = 1
  # By hand: s_k = sum of softmax(branch k's logits)[y]; the leader's pull on every entry is
  # beta (theta - theta_start) = 0.1 * 0.5 * exp(tanh(s_0 - s_1)), the other's 0.
  params, b = ns["params"], ns["train_batches"][0]
  scores = []
  for k, h in enumerate(_features(params, b["inputs"])):
    head = {n: np.asarray(v) for n, v in params[f"head_{k}"].items()}
    logits = h @ head["kernel"] + head["bias"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True)
    scores.append(float(p[np.arange(len(b["label"])), b["label"]].sum()))
  gap = scores[0] - scores[1]
  pulls = [0.1 * 0.5 * np.exp(np.tanh(g)) if g > 0 else 0.0 for g in (gap, -gap)]
  expected = f"[ True  True] {{0: {round(pulls[0], 4)}, 1: {round(pulls[1], 4)}}} True"
  assert max(pulls) > 0 and hand == expected


def test_every_page_with_code_has_a_test():
  with_code = {p.relative_to(DOCS).as_posix() for p in _pages() if _blocks(p)}
  # methods/adding_a_method.md: its files and test run in tests/test_adding_a_method.py.
  assert with_code == {"tutorials/own_model.md", "tutorials/handwritten_step.md",
                       "methods/ogm_ge.md", "methods/adding_a_method.md", "methods/agm.md",
                       "methods/mmpareto.md", "methods/pmr.md", "methods/inforeg.md"}, (
    "a page with Python blocks needs its test in tests/test_docs.py")


def _table(text: str, header: str) -> dict[str, list[str]]:
  """The rows of the Markdown table whose header starts with ``header``, by first cell."""
  lines = text[text.index(header):].splitlines()
  rows = {}
  for line in lines[2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split(" | ")]
    rows[cells[0]] = cells[1:]
  return rows


def test_readme_results_are_the_cells_of_their_study():
  readme = _table((ROOT / "README.md").read_text(), "| method | test ŷ |")
  study_file = DOCS / "results" / "colored_mnist_var_0.02" / "study.md"
  study = _table(study_file.read_text(), "| method | n |")
  header = [c.strip() for c in study_file.read_text().split("| method | n |")[1]
            .splitlines()[0].strip("|").split(" | ")]
  column = {name: i + 1 for i, name in enumerate(header)}  # after "n"
  assert len(readme) == 5
  for method, (test, branch0, d_util) in readme.items():
    row = study[method]
    assert test == row[column["test ŷ"]] and branch0 == row[column["test branch 0"]]
    assert d_util == row[column["d_util"]]


def test_results_page_states_each_figure_once_with_relative_paths(tmp_path):
  folder = tmp_path / "my_study"
  folder.mkdir()
  (folder / "notes.md").write_text("# My study\n\nWhat it says.\n")
  (folder / "study.md").write_text(
    "# Study: x\n\n`python -m gml_jax.runner.study --workdir /home/me/runs/s1 --seeds 0-1`\n\n"
    "## grid=1\n\n| method | n |\n|---|---|\n| guided | 2 |\n")
  for name in ("grid.png", "accuracy.png"):
    (folder / name).write_bytes(b"png")
  page = results_pages.study_page(folder)
  assert "--workdir runs/s1 " in page and results_pages.absolute_paths(page) == []
  assert page.count("](../my_study/accuracy.png)") == 1
  assert page.count("](../my_study/grid.png)") == 1
  assert page.index("accuracy.png") < page.index("grid.png")  # the known plots in order
  assert "### grid=1" in page  # the study's headings under "## Tables"
  assert results_pages.absolute_paths("see `/tmp/a/b` or https://x.org/a/b") == ["/tmp/a/b"]
  (folder / "notes.md").write_text("no title\n")
  with pytest.raises(ValueError, match="first line must be the page's title"):
    results_pages.study_page(folder)


def test_committed_results_hold_no_absolute_path_and_every_study_has_notes():
  for folder in sorted(p for p in (DOCS / "results").iterdir()
                       if p.is_dir() and p.name != GENERATED):
    assert (folder / "notes.md").is_file(), folder
    assert results_pages.absolute_paths(results_pages.study_page(folder)) == [], folder


def test_shell_blocks_name_real_make_targets_and_modules():
  makefile = (ROOT / "Makefile").read_text()
  targets = set(re.findall(r"^([a-z-]+):", makefile, flags=re.M))
  for page in [ROOT / "README.md", *_pages()]:
    for block in _blocks(page, "sh"):
      for target in re.findall(r"(?:^|\s)make ([a-z-]+)", block):
        assert target in targets, f"{page}: make {target}"
      for module in re.findall(r"python -m ([\w.]+)", block):
        path = ROOT.joinpath(*module.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), (
          f"{page}: python -m {module}")
