"""What the paper's methods (random, guided, fixed) share: the balancing transform and the
options of its re-balancing windows (Wu et al., ICML 2022; docs/methods/algorithm.md)."""

from __future__ import annotations

from gml_jax.balancing import UPDATE_MODES, BalanceState, balanced_multimodal
from gml_jax.runner.fields import integer, one_of
from gml_jax.runner.methods import Option

STATE_TYPES = (BalanceState,)

WINDOW_OPTIONS = {
    "window": Option(5, integer(1), "Q: re-balancing steps per decision (authors' value)"),
    "warmup_epochs": Option(1, integer(0), "epochs of normal steps first (the authors "
                                           "balance from the second epoch on)"),
    "update_mode": Option("branch", one_of(UPDATE_MODES),
                          "a re-balancing step moves branch k only ('branch', the paper) or "
                          "all but φ_k's fusion head ('all', the authors' code)"),
}


def transform(method: str, inner, options, context, **extra):
  """``inner`` inside the balancing transform in ``method`` with the window options."""
  return balanced_multimodal(
      inner, context.labels, method=method, window=options.window,
      warmup_steps=options.warmup_epochs * context.steps_per_epoch,
      update=options.update_mode, seed=context.seed, **extra)
