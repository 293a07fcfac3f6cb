"""pmr: PMR, prototypical modal rebalance (Fan et al., CVPR 2023; docs/methods/pmr.md): the
slow modality's prototypical cross-entropy added to the loss, the class prototypes
recomputed before every epoch from a fraction of the training split. Defaults: the authors'
CG-MNIST recipe (α 1.0, momentum 0, the first 60 % of epochs, a tenth of the data per
pass); ``pmr_bb``: BalanceBenchmark's (α 0.6, momentum 0.2, the clipped coefficient);
``pmr_all``: every modality's term at α (the control without PMR's decision)."""

from gml_jax.pmr import RULES, PMRState, pmr
from gml_jax.runner.fields import integer, number, one_of
from gml_jax.runner.methods import Method, Option
from gml_jax.runner.methods.ogm_ge import _epoch_window

WINDOW_FRACTION = 0.6  # the authors' CG-MNIST window: epochs 0-60 of 100


def window(epochs, num_epochs: int) -> tuple[int, int]:
  """(first, last) epochs, both included; () -> the first 60 % of the run's epochs."""
  if epochs:
    return tuple(epochs)
  return 0, max(0, int(WINDOW_FRACTION * num_epochs) - 1)


def _transform(inner, o, context):
  if context.num_classes is None or context.feature_dims is None:
    raise ValueError("pmr needs the dataset's classes and the model's feature sizes: "
                     "build.optimizer(..., num_classes=, feature_dims=).")
  return pmr(inner, num_classes=context.num_classes, feature_dims=context.feature_dims(),
             alpha=o.alpha, momentum=o.momentum, epochs=window(o.epochs, context.num_epochs),
             rule=o.rule, select=o.select, entropy=o.entropy, entropy_epochs=o.entropy_epochs)


def _balancebenchmark(c):
  """BalanceBenchmark's PMR (trainer_config.yaml @ 0f68d46): α 0.6, momentum 0.2, the
  clipped coefficient α min(1, 1/ρ - 1), μ 0.01 for 10 epochs."""
  o = c.balance.pmr
  o.alpha, o.momentum, o.rule, o.entropy = 0.6, 0.2, "clipped", 0.01


def _all(c):
  c.balance.pmr.select = "all"


METHOD = Method(
    name="pmr",
    summary="PMR: the slow modality's prototypical cross-entropy (distances to class "
            "prototypes recomputed every epoch) added to the loss",
    options={
        "alpha": Option(1.0, number(lambda v: v >= 0, ">= 0"),
                        "α, the slow modality's PCE weight (authors: 1.0 CG-MNIST, 2.0 "
                        "CREMA-D and AVE; BalanceBenchmark 0.6)"),
        "momentum": Option(0.0, number(lambda v: 0 <= v < 1, "in [0, 1)"),
                           "the prototypes' moving average over epochs (authors' scripts 0; "
                           "BalanceBenchmark 0.2)"),
        "epochs": Option((), (_epoch_window, "() (the first 60 % of epochs) or (first, "
                                             "last) epochs, 0 <= first <= last"),
                         "the epochs (first, last) PMR acts in, both included; (): the first "
                         "60 % (the authors' CG-MNIST 0-60 of 100)"),
        "rule": Option("authors", one_of(RULES), "'authors' (α for the slow modality) or "
                       "'clipped' (BalanceBenchmark's α min(1, 1/ρ - 1))"),
        "select": Option("slow", one_of(("slow", "all")), "'slow' (PMR) or 'all' (every "
                         "modality's term: a control)"),
        "entropy": Option(0.0, number(lambda v: v >= 0, ">= 0"),
                          "μ of the fast modality's prototype-entropy term (authors' code: 0)"),
        "entropy_epochs": Option(10, integer(0), "epochs from the window's first with the "
                                                 "entropy term (BalanceBenchmark 10)"),
        "prototype_fraction": Option(0.1, number(lambda v: 0 < v <= 1, "in (0, 1]"),
                                     "the share of the training split each epoch's prototype "
                                     "pass reads (authors: len(loader) // 10 batches)"),
    },
    transform=_transform,
    min_modalities=2,
    variants={"pmr_bb": _balancebenchmark, "pmr_all": _all},
    comparisons=(("pmr", "vanilla"), ("pmr_bb", "vanilla"), ("pmr", "pmr_all"),
                 ("pmr", "guided"), ("pmr", "ogm_ge"), ("pmr", "agm"), ("pmr", "mmpareto")),
    state_types=(PMRState,),
    position=7,
    epoch_share=lambda o: o.prototype_fraction,
)
