"""random: re-balancing steps at random times for random modalities (the paper's control)."""

from gml_jax.runner.methods import Method, Option, _paper


def _shares(v) -> bool:
  return v == () or (isinstance(v, (tuple, list)) and all(
      isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in v)
      and sum(v) <= 1 + 1e-9)


def _check(options, num_modalities: int) -> None:
  shares = options.get("shares", ())
  if shares and len(shares) != num_modalities:
    raise ValueError(f"config.balance.random.shares={tuple(shares)} is invalid: expected () "
                     f"or one share per branch ({num_modalities}).")


def _matched(c):
  """guided's shares where its windows run back to back: Q/(Q+1) of the steps after warm-up
  re-balance m0, none m1."""
  window = c.balance.random.window
  c.balance.random.shares = (window / (window + 1), 0.0)


METHOD = Method(
    name="random",
    summary="re-balancing steps drawn at random (uniformly, or at the given shares)",
    options={**_paper.WINDOW_OPTIONS,
             "shares": Option((), (_shares, "() (uniform draws) or one probability in [0, 1] "
                                            "per modality, summing to at most 1"),
                              "() uniform draws, or a probability per modality")},
    transform=lambda inner, o, context: _paper.transform(
        "random", inner, o, context, shares=tuple(o.shares) or None),
    rebalances=True,
    min_modalities=2,
    check=_check,
    variants={"random_matched": _matched},
    in_default_study=True,
    state_types=_paper.STATE_TYPES,
    position=1,
)
