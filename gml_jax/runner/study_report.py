"""A study's statistics (mean ± std over seeds, paired differences with a Student-t
interval), its tables (study.md) and figures (plots/*.png)."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gml_jax.balancing import BalanceState  # noqa: E402
from gml_jax.runner import methods, names, storage  # noqa: E402
from gml_jax.runner.plots import method_metrics, save  # noqa: E402

# Paired differences over seeds: (method, baseline) pairs named by the methods'
# registrations (gml_jax/runner/methods/: each names its baseline and its controls); the
# values compared are names.study_paired_metrics.
COMPARISONS = methods.comparisons()


def method_means(summaries) -> list[str]:
  """The means of the methods' own metrics that any of the summaries holds, in order."""
  known = [names.step_mean(k) for k in names.method_step_keys(study_modalities(summaries))]
  return [k for k in known if any(k in s for s in summaries)]


def study_modalities(summaries) -> list[int]:
  """The dataset modalities any of the runs read, in order."""
  return sorted({m for s in summaries for m in s.get(names.MODALITIES, ())})


# --------------------------------------------------------------------------------------
# Statistics


def mean_std(values) -> dict:
  """Mean, sample standard deviation (ddof 1; None for n < 2), the mean's 95% Student-t
  interval (None for n < 2) and n of the defined values; ``undefined`` counts the None
  values left out."""
  defined = [float(v) for v in values if v is not None]
  out = {"n": len(defined), "undefined": len(values) - len(defined), "mean": None, "std": None,
         "ci95": t_interval(defined)}
  if defined:
    out["mean"] = float(np.mean(defined))
  if len(defined) > 1:
    out["std"] = float(np.std(defined, ddof=1))
  return out


def t_interval(values, confidence: float = 0.95) -> tuple[float, float] | None:
  """Student-t confidence interval of the mean (None for n < 2)."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return None
  from scipy import stats  # most of a second to import: only where an interval is drawn

  half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(
      len(values))
  return float(values.mean() - half), float(values.mean() + half)


def aggregate(runs: list[dict]) -> dict:
  """``runs``: {method, seed, point, summary} of the finished runs -> per (point, method)
  mean ± std of every metric, and the paired differences per point."""
  groups, paired = [], []
  modalities = study_modalities(r["summary"] for r in runs)
  points = list(dict.fromkeys(r["point"] for r in runs))
  for point in points:
    at = [r for r in runs if r["point"] == point]
    methods = list(dict.fromkeys(r["method"] for r in at))
    by_seed = {m: {r["seed"]: r["summary"] for r in at if r["method"] == m} for m in methods}
    for m in methods:
      summaries = list(by_seed[m].values())
      keys = [*names.study_metrics(modalities), *method_means(summaries)]
      metrics = {k: mean_std([s.get(k) for s in summaries])
                 for k in keys if any(k in s for s in summaries)}
      groups.append({"point": point, "method": m, "seeds": sorted(by_seed[m]),
                     "metrics": metrics})
    for method, baseline in COMPARISONS:
      if method not in by_seed or baseline not in by_seed:
        continue
      seeds = sorted(by_seed[method].keys() & by_seed[baseline].keys())
      for key in names.study_paired_metrics(modalities):
        diffs = {s: by_seed[method][s].get(key) - by_seed[baseline][s].get(key) for s in seeds
                 if by_seed[method][s].get(key) is not None
                 and by_seed[baseline][s].get(key) is not None}
        if not diffs:
          continue
        values = list(diffs.values())
        paired.append({"point": point, "comparison": f"{method} - {baseline}", "metric": key,
                       "per_seed": diffs, "n": len(values), "mean": float(np.mean(values)),
                       "ci95": t_interval(values),
                       "undefined": len(seeds) - len(values)})
  return {"modalities": modalities, "groups": groups, "paired": paired}


# --------------------------------------------------------------------------------------
# Tables

def _sub(m: int) -> str:
  return str(m).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


def columns(modalities) -> list[tuple[str, str, str]]:
  """Columns of the table: (summary key, header, format)."""
  rates = [(j, k) for k in modalities for j in modalities if j != k]
  return [(names.split("test", names.ACCURACY), "test ŷ", ".3f"),
          *((names.split("test", names.branch_accuracy(m)), f"test branch {m}", ".3f")
            for m in modalities),
          (names.split("test_biased", names.ACCURACY), "test_biased ŷ", ".3f"),
          *((names.utilization(j, k), f"u(m{_sub(j)}\\|m{_sub(k)})", "+.3f") for j, k in rates),
          (names.D_UTIL, "d_util", "+.3f"),
          *((names.rebalance_share(m), f"re-bal. m{_sub(m)}", ".0%") for m in modalities),
          (names.SPEED_UTIL_CORRELATION, "ρ(d_speed, d_util)", "+.2f"),
          (names.SAMPLES_PER_S, "samples/s", ".0f")]


def _cell(stat: dict | None, fmt: str) -> str:
  if stat is None or stat["mean"] is None:
    return "–"
  text = format(stat["mean"], fmt)
  if stat["std"] is not None:
    text += " ± " + format(stat["std"], fmt.lstrip("+"))
  if stat["undefined"]:
    text += f" ({stat['undefined']} undef.)"
  return text


def _method_means_table(groups: list[dict], modalities) -> list[str]:
  """The methods' own metrics (each run's mean over its steps; mean ± std over seeds), for
  the groups whose method declares some."""
  keys = [names.step_mean(k) for k in names.method_step_keys(modalities)]
  keys = [k for k in keys if any(k in g["metrics"] for g in groups)]
  rows = [g for g in groups if any(k in g["metrics"] for k in keys)]
  if not rows:
    return []
  lines = ["The methods' own metrics (each run's mean over its steps):", "",
           "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  lines += [f"| {g['method']} | " + " | ".join(_cell(g["metrics"].get(k), ".3g") for k in keys)
            + " |" for g in rows]
  return [*lines, ""]


def markdown(result: dict) -> str:
  """Per grid point: mean ± std (n) per method; then the paired differences."""
  lines = [f"# Study: {result['experiment']}", "", f"`{result['command']}`", ""]
  table = columns(result["modalities"])
  for point in dict.fromkeys(g["point"] for g in result["groups"]):
    if point:
      lines += [f"## {point}", ""]
    lines.append("| method | n | " + " | ".join(h for _, h, _ in table) + " |")
    lines.append("|---" * (len(table) + 2) + "|")
    for g in [g for g in result["groups"] if g["point"] == point]:
      n = max((s["n"] for s in g["metrics"].values()), default=0)
      cells = [_cell(g["metrics"].get(key), fmt) for key, _, fmt in table]
      lines.append(f"| {g['method']} | {n} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += _method_means_table([g for g in result["groups"] if g["point"] == point],
                                 result["modalities"])
    tracked = [(g["method"], g["metrics"][names.SPEED_UTIL_CORRELATION])
               for g in result["groups"] if g["point"] == point
               and (g["metrics"].get(names.SPEED_UTIL_CORRELATION) or {}).get("mean") is not None]
    if tracked:
      lines += ["How closely d_speed tracks the validation d_util over training (Spearman's ρ "
                "over a run's epochs; mean over seeds, 95% Student-t interval):", ""]
      for method, stat in tracked:
        ci = "" if stat["ci95"] is None else f" [{stat['ci95'][0]:+.2f}, {stat['ci95'][1]:+.2f}]"
        lines.append(f"- {method}: {stat['mean']:+.2f}{ci} (n = {stat['n']})")
      lines.append("")
    paired = [p for p in result["paired"] if p["point"] == point]
    if paired:
      lines += ["Paired differences over seeds (mean, 95% Student-t interval, per seed):", "",
                "| difference | value | mean | 95% CI | per seed |", "|---|---|---|---|---|"]
      for p in paired:
        ci = "–" if p["ci95"] is None else f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"
        seeds = ", ".join(f"{s}: {d:+.3f}" for s, d in p["per_seed"].items())
        lines.append(f"| {p['comparison']} | {p['metric']} | {p['mean']:+.3f} | {ci} | {seeds} |")
      lines.append("")
  failed = [r for r in result["runs"] if r["status"] in ("failed", "unreadable")]
  if failed:
    lines += ["Failed runs (left out): " + ", ".join(
        f"{r['method']} seed {r['seed']} {r['point']} "
        f"({r.get('problem') or r['workdir'] + '/run.log'})" for r in failed), ""]
  return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Figures


def _series(group: dict) -> str:
  """A group's label: the method, and its grid point on a line of its own."""
  return f"{group['method']}\n{group['point']}".strip()


def _read_jsonl(path: storage.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _points_plot(result: dict, keys: list[tuple[str, str]], path: storage.Path, title: str,
                 ylabel: str, runs_by_group) -> None:
  """Per series: the mean with ±std error bars and every seed as a dot, for each key."""
  groups = result["groups"]
  fig, ax = plt.subplots(figsize=(max(6, 2.4 * len(groups)), 4.5))
  width = 0.8 / len(keys)
  for j, (key, label) in enumerate(keys):
    for i, g in enumerate(groups):
      stat = g["metrics"].get(key)
      if stat is None or stat["mean"] is None:
        continue
      x = i + (j - (len(keys) - 1) / 2) * width
      ax.errorbar(x, stat["mean"], yerr=stat["std"] or 0, fmt="o", color=f"C{j}", capsize=4,
                  ms=8, label=label if i == 0 else None)
      values = [s[key] for s in runs_by_group(g) if s.get(key) is not None]
      ax.scatter(np.full(len(values), x) + 0.06, values, s=12, color=f"C{j}", alpha=0.5)
  ax.set_xticks(range(len(groups)), [_series(g) for g in groups])
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.axhline(0, color="grey", lw=0.5)
  ax.legend(loc="best", fontsize="small")
  fig.tight_layout()
  save(fig, path)


def plots(result: dict, runs: dict, plot_dir: storage.Path) -> None:
  """accuracy.png, utilization.png, speeds.png and validation.png of a study;
  speed_vs_utilization.png where runs measured the utilization at epoch ends; grid.png for
  a numeric grid axis; <variant>.png for each variant whose method reports metrics of its
  own (without a grid). ``runs`` maps a run's workdir to its record (method, seed, point)."""
  plot_dir.mkdir(parents=True, exist_ok=True)

  def members(g):
    return [r for r in runs.values() if r.method == g["method"] and r.point_label == g["point"]]

  summaries = lambda g: [r.summary() for r in members(g)]
  modalities = result["modalities"]
  accuracies = [(names.split("test", names.ACCURACY), "fused ŷ"),
                *((names.split("test", names.branch_accuracy(m)), f"branch {m}")
                  for m in modalities)]
  _points_plot(result, accuracies,
               plot_dir / "accuracy.png", "Test accuracy (mean ± std over seeds; dots: seeds)",
               "test accuracy", summaries)
  rates = [names.utilization(j, k) for k in modalities for j in modalities if j != k]
  _points_plot(result, [(key, key) for key in [*rates, names.D_UTIL]],
               plot_dir / "utilization.png",
               "Conditional utilization rates (mean ± std over seeds; dots: seeds)",
               "rate (negative: removing the modality helped)", summaries)
  groups = result["groups"]
  # Speeds exist where the model has fusion layers (summaries before `fusion` all had).
  measured = [g for g in groups
              if members(g)[0].summary().get(names.FUSION, "mmtm") == "mmtm"]
  if measured:
    _speeds_plot(measured, members, plot_dir / "speeds.png")
  epoch_rows = {id(r): _read_jsonl(r.workdir / "metrics" / "epochs.jsonl") for r in runs.values()}
  _validation_plot(groups, members, epoch_rows, plot_dir / "validation.png")
  if any(row.get(names.val(names.D_UTIL)) is not None for rows in epoch_rows.values()
         for row in rows):
    _speed_vs_utilization_plot(groups, members, epoch_rows, plot_dir / "speed_vs_utilization.png")
  numeric = _numeric_axes(list(runs.values()))
  if numeric:  # the first numeric axis; the other axes' values make series
    _grid_plot(numeric[0], list(runs.values()), modalities, plot_dir / "grid.png")
  for g in groups:  # <variant>.png: the metrics its method's transforms declare
    templates = _method_templates(g["method"])
    if templates and not g["point"]:
      _method_plot(g, members(g), templates, plot_dir / f"{g['method']}.png")


def _method_templates(variant: str) -> dict[str, str]:
  """The metrics (name -> row-key template) that variant's method's own transforms declare
  (the balancing transform's, the speeds, have speeds.png)."""
  if variant not in methods.variants():
    return {}
  return {k: t for state in methods.variant_method(variant).state_types
          if state is not BalanceState for k, t in state.METRICS.items()}


def _method_plot(group: dict, members, templates: dict[str, str], path: storage.Path) -> None:
  """The study's counterpart of a run's plots/<method>.png: each metric over steps, the
  mean over seeds with a min-max band."""
  rows = [_read_jsonl(r.workdir / "metrics" / "steps.jsonl") for r in members]
  length = min(len(r) for r in rows)
  stride = max(1, length // 200)  # 200 points a line say as much, in a smaller file
  method_metrics([r[:length:stride] for r in rows], _group_modalities(members), templates,
                 f"{group['method']}: its metrics over training (mean over {len(rows)} "
                 "seeds; band: min-max)", path)


def _group_modalities(members) -> list[int]:
  return members[0].summary()[names.MODALITIES]


def _speeds_plot(groups, members, path: storage.Path) -> None:
  """d_speed, s_0 and s_1 over steps per series: mean over seeds and a min-max band; below,
  the share of seeds re-balancing each modality at each step."""
  fig, axes = plt.subplots(3, len(groups), figsize=(4.5 * len(groups), 8), squeeze=False,
                           sharex="col", sharey="row",
                           gridspec_kw={"height_ratios": [3, 3, 1]})
  for col, g in enumerate(groups):
    rows = [_read_jsonl(r.workdir / "metrics" / "steps.jsonl") for r in members(g)]
    modalities = _group_modalities(members(g))
    length = min(len(r) for r in rows)
    steps = np.array([row[names.STEP] for row in rows[0][:length]])
    series = lambda key, rows=rows, length=length: np.array(
        [[row[key] for row in r[:length]] for r in rows])
    top, middle, bottom = axes[:, col]
    speeds = [names.speed(m) for m in modalities]
    for ax, keys in ((top, [names.D_SPEED]), (middle, speeds)):
      for j, key in enumerate(keys):
        color = f"C{3 if key == names.D_SPEED else j}"
        values = series(key)
        ax.plot(steps, values.mean(0), color=color, lw=1, label=key)
        ax.fill_between(steps, values.min(0), values.max(0), alpha=0.25, color=color)
      ax.axhline(0, color="grey", lw=0.5)
      ax.legend(loc="best", fontsize="small")
    targets = series(names.TARGET)  # branch indices
    for branch in range(targets.max(initial=-1) + 1):
      bottom.plot(steps, (targets == branch).mean(0), color=f"C{branch}", lw=0.8,
                  label=f"m{modalities[branch]}")
    if targets.max(initial=-1) >= 0:
      bottom.legend(loc="upper right", fontsize="x-small")
    top.set_title(f"{_series(g)} ({len(rows)} seeds)")
    bottom.set_xlabel("step")
  axes[0, 0].set_ylabel("d_speed (log10)")
  axes[1, 0].set_ylabel("conditional learning speed s_k")
  axes[2, 0].set_ylabel("share of seeds\nre-balancing")
  fig.suptitle("Conditional learning speeds over training (mean; band: min-max over seeds)")
  fig.tight_layout()
  save(fig, path, dpi=110)


def _validation_plot(groups, members, epoch_rows, path: storage.Path) -> None:
  """Validation accuracy of each branch over epochs per series (mean over seeds, band)."""
  fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False,
                           sharey=True)
  for col, g in enumerate(groups):
    ax = axes[0, col]
    rows = [epoch_rows[id(r)] for r in members(g)]
    length = min(len(r) for r in rows)
    epochs = [row[names.EPOCH] for row in rows[0][:length]]
    series = [(names.val(names.ACCURACY), "fused ŷ"),
              *((names.val(names.branch_accuracy(m)), f"branch {m}")
                for m in _group_modalities(members(g)))]
    for j, (key, label) in enumerate(series):
      values = np.array([[row[key] for row in r[:length]] for r in rows])
      ax.plot(epochs, values.mean(0), marker="o", ms=3, color=f"C{j}", label=label)
      ax.fill_between(epochs, values.min(0), values.max(0), alpha=0.2, color=f"C{j}")
    ax.set_title(f"{_series(g)} ({len(rows)} seeds)")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize="small")
  axes[0, 0].set_ylabel("validation accuracy")
  fig.suptitle("Validation accuracy per branch (mean; band: min-max over seeds)")
  fig.tight_layout()
  save(fig, path, dpi=110)


def _speed_vs_utilization_plot(groups, members, epoch_rows, path: storage.Path) -> None:
  """Every epoch of every run: d_speed at the epoch's end against the validation d_util
  there, one panel per series; a proxy that tracks the rate lines the dots up."""
  fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), squeeze=False,
                           sharex=True, sharey=True)
  for ax, g in zip(axes[0], groups):
    for i, r in enumerate(members(g)):
      rows = [row for row in epoch_rows[id(r)]
              if row.get(names.val(names.D_UTIL)) is not None and names.D_SPEED in row]
      ax.plot([row[names.D_SPEED] for row in rows], [row[names.val(names.D_UTIL)] for row in rows],
              "o-", ms=3, lw=0.6, alpha=0.8, color=f"C{i}", label=f"seed {r.seed}")
    stat = g["metrics"].get(names.SPEED_UTIL_CORRELATION)
    rho = f", ρ = {stat['mean']:+.2f}" if stat and stat["mean"] is not None else ""
    ax.set_title(f"{_series(g)}{rho}", fontsize="small")
    ax.set_xlabel("d_speed (epoch's last step)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
  axes[0, 0].set_ylabel("validation d_util")
  axes[0, 0].legend(loc="best", fontsize="x-small")
  fig.suptitle("d_speed against d_util at every epoch end (a line per run, epochs in order)")
  fig.tight_layout()
  save(fig, path, dpi=110)


def _is_number(text) -> bool:
  try:
    float(text)
  except (TypeError, ValueError):
    return False
  return True


def _numeric_axes(runs) -> list[str]:
  """The grid fields whose values are all numbers, in the grid's order."""
  fields = list(dict.fromkeys(k for r in runs for k, _ in r.point))
  return [f for f in fields if all(_is_number(dict(r.point).get(f)) for r in runs)]


def _grid_plot(field: str, runs, modalities, path: storage.Path) -> None:
  """Test ŷ and the share of re-balancing steps per modality against a numeric grid axis:
  one line per method and value of the other axes, mean over seeds with ±std bars."""
  keys = [(names.split("test", names.ACCURACY), "test ŷ"),
          *((names.rebalance_share(m), f"re-balancing share m{m}") for m in modalities)]
  series = {}
  for r in runs:
    others = ",".join(f"{k}={v}" for k, v in r.point if k != field)
    series.setdefault(f"{r.method} {others}".strip(), []).append(r)
  values = sorted({float(dict(r.point)[field]) for r in runs})
  summaries = {id(r): r.summary() for r in runs}  # each file read once
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2), squeeze=False)
  for ax, (key, label) in zip(axes[0], keys):
    for i, (name, members) in enumerate(series.items()):
      at = [[summaries[id(r)].get(key) for r in members if float(dict(r.point)[field]) == v]
            for v in values]
      stats_at = [mean_std(x) for x in at]
      xs = [v for v, st in zip(values, stats_at) if st["mean"] is not None]
      ys = [st["mean"] for st in stats_at if st["mean"] is not None]
      errs = [st["std"] or 0 for st in stats_at if st["mean"] is not None]
      ax.errorbar(xs, ys, yerr=errs, marker="o", ms=4, capsize=3, color=f"C{i}", label=name)
    if values[0] > 0 and values[-1] / values[0] >= 10:
      ax.set_xscale("log")
    ax.set_xlabel(field)
    ax.set_title(label)
  axes[0, 0].legend(loc="best", fontsize="x-small")
  fig.suptitle(f"Against {field} (mean ± std over seeds)")
  fig.tight_layout()
  save(fig, path, dpi=110)
