"""PNG plots of a run: speeds with re-balancing steps, the method's own metrics, accuracies,
utilization rates, and d_speed against d_util over training."""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gml_jax.runner import names, storage  # noqa: E402


def save(fig, path: storage.Path, dpi: int = 120) -> None:
  """``fig`` as a PNG at ``path`` (a local file or an object: written through a stream)."""
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=dpi)
  plt.close(fig)


def speeds(step_rows: list[dict], modalities: Sequence[int], path: storage.Path) -> None:
  """s_k and d_speed over training; re-balancing steps marked per modality."""
  steps = np.array([r[names.STEP] for r in step_rows])
  n = len(modalities)
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True,
                                    gridspec_kw={"height_ratios": [3, 1]})
  for m in modalities:
    top.plot(steps, [r[names.speed(m)] for r in step_rows], label=f"$s_{m}$")
  top.plot(steps, [r[names.D_SPEED] for r in step_rows], "k--", lw=1, label="d_speed")
  top.axhline(0, color="grey", lw=0.5)
  top.set_ylabel("conditional learning speed (log10)")
  top.legend(loc="best")
  targets = np.array([r[names.TARGET] for r in step_rows])  # branch indices
  for branch in range(n):
    hit = steps[targets == branch]
    bottom.vlines(hit, branch - 0.4, branch + 0.4, color=f"C{branch}", lw=0.8)
  bottom.set_yticks(range(n), [f"re-bal. m{m}" for m in modalities])
  bottom.set_ylim(-0.6, n - 0.4)
  bottom.set_xlabel("step")
  share = ", ".join(f"m{m}: {np.mean(targets == b):.0%}" for b, m in enumerate(modalities))
  top.set_title(f"Conditional learning speeds (re-balancing steps {share})")
  fig.tight_layout()
  save(fig, path)


def accuracy(epoch_rows: list[dict], modalities: Sequence[int], path: storage.Path) -> None:
  """Per-branch (and fused) train and validation accuracy per epoch."""
  epochs = [r[names.EPOCH] for r in epoch_rows]
  series = [(names.ACCURACY, "fused ŷ"),
            *((names.branch_accuracy(m), f"branch {m}") for m in modalities)]
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, (key, label) in enumerate(series):
    ax.plot(epochs, [r.get(names.train(key), np.nan) for r in epoch_rows], color=f"C{i}",
            ls="--", label=f"{label} (train)")
    ax.plot(epochs, [r[names.val(key)] for r in epoch_rows], color=f"C{i}", marker="o",
            label=f"{label} (validation)")
  ax.set_xlabel("epoch")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1.02)
  ax.legend(loc="lower right", fontsize="small")
  ax.set_title("Accuracy per branch")
  fig.tight_layout()
  save(fig, path)


def utilization(summary: dict, path: storage.Path) -> None:
  """Bars of the conditional utilization rates u(m_j|m_k) and d_util."""
  rates = [names.utilization(j, k) for j, k in names.utilization_pairs(summary[names.MODALITIES])]
  keys = [k for k in [*rates, names.D_UTIL]
          if summary.get(k) is not None]  # absent, or undefined: a branch scored 0
  values = [summary[k] for k in keys]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.bar(keys, values, color=["C0" if v >= 0 else "C3" for v in values])
  ax.axhline(0, color="grey", lw=0.5)
  for i, v in enumerate(values):
    ax.annotate(f"{v:+.3f}", (i, v), ha="center", va="bottom" if v >= 0 else "top")
  ax.set_ylabel("rate (negative: removing the modality helped)")
  ax.set_title(f"Conditional utilization ({summary.get('method', '')}, test split)")
  fig.tight_layout()
  save(fig, path)


def speed_and_utilization(epoch_rows: list[dict], summary: dict, path: storage.Path) -> None:
  """d_speed at each epoch's end (the proxy) beside the validation d_util measured there."""
  rows = [r for r in epoch_rows if r.get(names.val(names.D_UTIL)) is not None]
  epochs = [r[names.EPOCH] for r in rows]
  fig, ax = plt.subplots(figsize=(8, 4.5))
  ax.plot(epochs, [r[names.val(names.D_UTIL)] for r in rows], "o-", color="C0",
          label="d_util (validation)")
  ax.set_ylabel("d_util = u(m1|m0) − u(m0|m1)", color="C0")
  ax.set_xlabel("epoch")
  ax.axhline(0, color="grey", lw=0.5)
  right = ax.twinx()
  right.plot(epochs, [r[names.D_SPEED] for r in rows], "s--", color="C3",
             label="d_speed (epoch's last step)")
  right.set_ylabel("d_speed = s0 − s1 (log10)", color="C3")
  rho = summary.get(names.SPEED_UTIL_CORRELATION)
  ax.set_title(f"{summary.get('method', '')}: d_speed and d_util over training"
               + (f" (Spearman ρ = {rho:+.2f})" if rho is not None else ""))
  fig.legend(loc="lower right", fontsize="small")
  fig.tight_layout()
  save(fig, path)


def method_metrics(runs: list[list[dict]], modalities: Sequence[int],
                   templates: dict[str, str], title: str, path: storage.Path) -> None:
  """Every metric a method's transform declares (``templates``: name -> row-key template),
  one panel each over the steps of ``runs`` (each run's step rows, steps aligned): a line
  per modality, or one for a scalar; the mean over the runs with a min-max band when there
  are several (a study's seeds)."""
  steps = np.array([r[names.STEP] for r in runs[0]])
  fig, axes = plt.subplots(len(templates), 1, figsize=(9, 2.5 + 2.2 * len(templates)),
                           sharex=True, squeeze=False)
  for ax, (metric, template) in zip(axes[:, 0], templates.items()):
    keys = ([(names.row_key(template, m), f"m{m}") for m in modalities]
            if names.per_modality(template) else [(template, None)])
    for i, (key, label) in enumerate(keys):
      values = np.array([[row.get(key, np.nan) for row in rows] for rows in runs], float)
      ax.plot(steps, values.mean(0), color=f"C{i}", lw=0.8, label=label)
      if len(runs) > 1:
        ax.fill_between(steps, values.min(0), values.max(0), alpha=0.25, color=f"C{i}")
    ax.set_ylabel(metric)
    if names.per_modality(template):
      ax.legend(loc="best", fontsize="small")
  axes[-1, 0].set_xlabel("step")
  axes[0, 0].set_title(title)
  fig.tight_layout()
  save(fig, path)


def write_run_plots(plot_dir: storage.Path, step_rows: list[dict], epoch_rows: list[dict],
                    summary: dict, method_templates: dict[str, str] | None = None) -> None:
  """accuracy.png of a finished run; speeds.png where it measured speeds, <method>.png with
  the metrics its method's transform declares (``method_templates``; e.g. OGM-GE's ratios
  and coefficients), utilization.png where it has fusion layers, speed_vs_utilization.png
  where it measured the utilization at epoch ends."""
  plot_dir.mkdir(exist_ok=True)
  modalities = summary[names.MODALITIES]
  if names.D_SPEED in step_rows[0]:
    speeds(step_rows, modalities, plot_dir / "speeds.png")
  if method_templates:
    method = summary.get("method", "method")
    method_metrics([step_rows], modalities, method_templates,
                   f"{method}: its metrics over training", plot_dir / f"{method}.png")
  accuracy(epoch_rows, modalities, plot_dir / "accuracy.png")
  if summary[names.FUSION] == "mmtm":
    utilization(summary, plot_dir / "utilization.png")
  if any(r.get(names.val(names.D_UTIL)) is not None for r in epoch_rows):
    speed_and_utilization(epoch_rows, summary, plot_dir / "speed_vs_utilization.png")
