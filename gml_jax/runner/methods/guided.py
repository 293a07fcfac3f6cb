"""guided: the paper's method, re-balancing the faster modality when the speeds differ by
more than α (Wu et al., ICML 2022; docs/methods/algorithm.md)."""

from gml_jax.runner.fields import number
from gml_jax.runner.methods import Method, Option, _paper

METHOD = Method(
    name="guided",
    summary="the paper's guided re-balancing: after a normal step with |d_speed| > α, Q "
            "re-balancing steps for the faster modality",
    options={"alpha": Option(0.01, number(lambda v: v >= 0, ">= 0"),
                             "threshold on |d_speed| (log10 scale), authors' value"),
             **_paper.WINDOW_OPTIONS},
    transform=lambda inner, o, context: _paper.transform("guided", inner, o, context,
                                                         alpha=o.alpha),
    rebalances=True,
    min_modalities=2,
    # The decision's controls: its schedule pinned to each modality (does the decision
    # matter?) and random draws at its shares (does the timing?); and the other methods.
    comparisons=(("guided", "vanilla"), ("guided", "random"), ("guided", "ogm_ge"),
                 ("guided", "ogm_ge_joint"), ("guided", "fixed_0"), ("guided", "fixed_1"),
                 ("guided", "random_matched")),
    in_default_study=True,
    state_types=_paper.STATE_TYPES,
    position=2,
)
