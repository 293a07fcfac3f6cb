"""ogm_ge: OGM-GE (Peng et al., CVPR 2022; docs/methods/ogm_ge.md), on this project's model and as
its authors run it (``ogm_ge_joint``)."""

from gml_jax.modulation import OGMState, ogm_ge
from gml_jax.runner.fields import FLAG, number, one_of
from gml_jax.runner.methods import Method, Option

# What is modulated: every parameter of a branch, or its encoder's kernels of rank >= 2
# (not biases, normalisation or heads: the authors' scope).
SCOPES = ("branch", "encoder_kernels")


def _epoch_window(v) -> bool:
  return v == () or (isinstance(v, (tuple, list)) and len(v) == 2 and all(
      isinstance(e, int) and not isinstance(e, bool) for e in v) and 0 <= v[0] <= v[1])


def update_window(epochs, steps_per_epoch: int):
  """The epochs (first, last), both included as in the authors' code, as the transform's
  window of updates; () (every epoch): None."""
  if not epochs:
    return None
  first, last = epochs
  return first * steps_per_epoch, (last + 1) * steps_per_epoch


def _transform(inner, o, context):
  encoder_kernels = o.scope == "encoder_kernels"
  window = update_window(o.epochs, context.steps_per_epoch)
  return ogm_ge(inner, context.encoder_labels if encoder_kernels else context.labels,
                alpha=o.alpha, noise=o.noise, seed=context.seed, continuous=o.continuous,
                scope="kernels" if encoder_kernels else "branch", window=window)


def _joint(c):
  """The authors' model, scope and window: late fusion through one joint head, encoder
  kernels, their first half of epochs."""
  c.model.fusion, c.model.head = "none", "joint"
  c.balance.ogm_ge.scope = "encoder_kernels"
  c.balance.ogm_ge.epochs = (0, c.num_epochs // 2)


METHOD = Method(
    name="ogm_ge",
    summary="OGM-GE: the leading branch's gradients damped by 1 - tanh(α ρ), plus noise",
    options={
        "alpha": Option(0.8, number(lambda v: v > 0, "> 0"), "α of the coefficient "
                                                              "1 - tanh(α ρ)"),
        "noise": Option(True, FLAG, "add the generalisation-enhancement noise (GE)"),
        "continuous": Option(False, FLAG, "1 - tanh(α (ρ - 1)) instead of the paper's α ρ"),
        "scope": Option("branch", one_of(SCOPES), "'branch' (every parameter of a branch, its "
                        "head included) or 'encoder_kernels' (the authors' scope)"),
        "epochs": Option((), (_epoch_window, "() (every epoch) or (first, last) epochs, "
                                             "0 <= first <= last"),
                         "the epochs (first, last) that modulate, both included; (): every "
                         "epoch. Set it again when changing num_epochs"),
    },
    transform=_transform,
    min_modalities=2,
    variants={"ogm_ge_joint": _joint},
    comparisons=(("ogm_ge", "vanilla"), ("ogm_ge_joint", "late_fusion_joint")),
    state_types=(OGMState,),
    position=4,
)
