"""agm: AGM, adaptive gradient modulation by Shapley mono-modal losses (Li et al., ICCV
2023; docs/methods/agm.md). Defaults: the authors' CREMA-D recipe (α 1.5, cap 10, no head
guard, every epoch); ``agm_bb``: BalanceBenchmark's (α 0.1, cap 7, kernels only)."""

from gml_jax.agm import AGMState, agm
from gml_jax.runner.fields import number, one_of
from gml_jax.runner.methods import Method, Option
from gml_jax.runner.methods.ogm_ge import SCOPES, _epoch_window, update_window


def _transform(inner, o, context):
  kernels = o.scope == "encoder_kernels"
  return agm(inner, context.encoder_labels if kernels else context.labels, alpha=o.alpha,
             scope="kernels" if kernels else "branch",
             window=update_window(o.epochs, context.steps_per_epoch),
             cap=o.cap or None, clip=o.clip or None)


def _check(o, num_modalities: int) -> None:
  del num_modalities
  if o.clip and o.scope != "encoder_kernels":
    raise ValueError("config.balance.agm.clip watches the head's gradient, which only "
                     "balance.agm.scope='encoder_kernels' leaves out of the branches: set "
                     "that scope, or clip=0.")


def _balancebenchmark(c):
  """BalanceBenchmark's AGM (trainer_config.yaml @ 058d222): α 0.1, cap 7, kernels only."""
  c.balance.agm.alpha, c.balance.agm.cap = 0.1, 7.0
  c.balance.agm.scope = "encoder_kernels"


METHOD = Method(
    name="agm",
    summary="AGM: each branch's gradients scaled by exp(α (r̄_k - r_k)), r_k the ratio of its "
            "Shapley mono-modal loss to the others'",
    options={
        "alpha": Option(1.5, number(lambda v: v > 0, "> 0"),
                        "α, the modulation's strength (authors: 1.5 CREMA-D, 2.5 AV-MNIST, "
                        "4.0 UR-Funny; BalanceBenchmark 0.1)"),
        "cap": Option(10.0, number(lambda v: v >= 0, ">= 0"),
                      "cap on r̄_k - r_k (authors: 10 CREMA-D and AVE, 7 UR-Funny; 0: none)"),
        "clip": Option(0.0, number(lambda v: v >= 0, ">= 0"),
                       "the authors' head guard: global-norm clip to this when a head gradient "
                       "entry exceeds it (authors 1 CREMA-D; 0: off, as docs/methods/agm.md "
                       "argues)"),
        "scope": Option("branch", one_of(SCOPES), "'branch' (every parameter of a branch) or "
                        "'encoder_kernels' (BalanceBenchmark's rank >= 2 leaves)"),
        "epochs": Option((), (_epoch_window, "() (every epoch) or (first, last) epochs, "
                                             "0 <= first <= last"),
                         "the epochs (first, last) that modulate, both included (authors' "
                         "default 0..20); (): every epoch"),
    },
    transform=_transform,
    min_modalities=2,
    check=_check,
    variants={"agm_bb": _balancebenchmark},
    comparisons=(("agm", "vanilla"), ("agm_bb", "vanilla"), ("agm", "agm_bb"),
                 ("agm", "guided"), ("agm", "ogm_ge")),
    state_types=(AGMState,),
    position=5,
)
