"""fixed: guided's schedule with its target pinned and no speed test (a control for guided's
decision); variants fixed_0 and fixed_1."""

from gml_jax.runner.fields import integer
from gml_jax.runner.methods import Method, Option, _paper


def _check(options, num_modalities: int) -> None:
  if options.get("target", 0) >= num_modalities:
    raise ValueError(f"config.balance.fixed.target={options.target} is invalid: method "
                     f"'fixed' re-balances a branch, and the model has {num_modalities}.")


def _pinned(target: int):
  def edit(c):
    c.balance.fixed.target = target
  return edit


METHOD = Method(
    name="fixed",
    summary="guided's schedule with the target pinned and no speed test (a control)",
    options={**_paper.WINDOW_OPTIONS,
             "target": Option(0, integer(0), "the modality its windows re-balance")},
    transform=lambda inner, o, context: _paper.transform("fixed", inner, o, context,
                                                         target=o.target),
    rebalances=True,
    min_modalities=2,
    check=_check,
    variants={"fixed_0": _pinned(0), "fixed_1": _pinned(1)},
    # the pinned schedule against random draws at its shares: same amount, other times
    comparisons=(("fixed_0", "random_matched"),),
    state_types=_paper.STATE_TYPES,
    position=3,
    own_variant=False,  # a variant names its target: fixed_0, fixed_1
)
