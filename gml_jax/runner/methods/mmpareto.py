"""mmpareto: MMPareto, the fused and unimodal losses' gradients combined per encoder by
their min-norm (Pareto) weights where they conflict (Wei and Hu, ICML 2024;
docs/methods/mmpareto.md). The step minimises the fused plus every branch's loss; defaults:
the authors' γ 1.5. ``mmpareto_sum``: that loss with plain gradients (the control: do the
unimodal losses alone, without the combination, give the gain?)."""

from gml_jax.mmpareto import MMParetoState, mmpareto
from gml_jax.runner.fields import FLAG, number
from gml_jax.runner.methods import Method, Option


def _transform(inner, o, context):
  if not o.combine:
    return inner
  return mmpareto(inner, context.encoder_labels, gamma=o.gamma)


def _sum(c):
  c.balance.mmpareto.combine = False


METHOD = Method(
    name="mmpareto",
    summary="MMPareto: per encoder, the fused and own losses' gradients averaged where they "
            "agree, min-norm weighted where they conflict, rescaled, times γ",
    options={
        "gamma": Option(1.5, number(lambda v: v > 0, "> 0"),
                        "γ, the combined gradient's scale (authors' code: 1.5)"),
        "combine": Option(True, FLAG, "combine the gradients (false: the plain gradient of "
                                      "the same loss, a control)"),
    },
    transform=_transform,
    min_modalities=2,
    variants={"mmpareto_sum": _sum},
    comparisons=(("mmpareto", "vanilla"), ("mmpareto", "mmpareto_sum"),
                 ("mmpareto_sum", "vanilla"), ("mmpareto", "guided"), ("mmpareto", "ogm_ge"),
                 ("mmpareto", "agm")),
    state_types=(MMParetoState,),
    position=6,
    loss="both",
)
