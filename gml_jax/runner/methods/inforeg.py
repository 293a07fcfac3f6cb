"""inforeg: InfoReg, the leading modality pulled toward its epoch-start parameters while its
prime learning window is open (Huang et al., CVPR 2025; docs/methods/inforeg.md). Defaults:
the authors' CREMA-D recipe (strength 0.95, τ 0.05, H 10, each modality's own trace);
``inforeg_open``: every window always open (the control for the window)."""

from gml_jax.inforeg import InfoRegState, inforeg
from gml_jax.runner.fields import integer, number
from gml_jax.runner.methods import Method, Option

ALWAYS_OPEN = -1e30  # a threshold below any rate: every window stays open


def _transform(inner, o, context):
  return inforeg(inner, context.encoder_labels, strength=o.strength, threshold=o.threshold,
                 history=o.history,
                 window_modality=None if o.window_modality < 0 else o.window_modality)


def _check(o, num_modalities: int) -> None:
  if o.window_modality >= num_modalities:
    raise ValueError(f"config.balance.inforeg.window_modality={o.window_modality} is "
                     f"invalid: expected -1 or a branch in [0, {num_modalities}).")


def _open(c):
  c.balance.inforeg.threshold = ALWAYS_OPEN


METHOD = Method(
    name="inforeg",
    summary="InfoReg: while its information window is open, the leading branch's gradients "
            "gain c·exp(tanh Δ)·(θ - θ_epoch start)",
    options={
        "strength": Option(0.95, number(lambda v: v >= 0, ">= 0"),
                           "c, the pull's strength (authors' CREMA-D: 0.95 for the leading "
                           "audio, 0.1 for video)"),
        "threshold": Option(0.05, number(lambda v: True, ""),
                            "τ: a window is open while the trace's rate exceeds it (authors "
                            "0.05)"),
        "history": Option(10, integer(1), "H, the epochs of the traces' moving averages "
                                          "(authors 10)"),
        "window_modality": Option(-1, integer(-1), "-1: each branch's window from its own "
                                  "trace; j: every window from branch j's (the authors' "
                                  "code uses audio's)"),
    },
    transform=_transform,
    min_modalities=2,
    check=_check,
    variants={"inforeg_open": _open},
    comparisons=(("inforeg", "vanilla"), ("inforeg", "inforeg_open"), ("inforeg", "guided"),
                 ("inforeg", "ogm_ge"), ("inforeg", "agm"), ("inforeg", "mmpareto"),
                 ("inforeg", "pmr")),
    state_types=(InfoRegState,),
    position=8,
)
