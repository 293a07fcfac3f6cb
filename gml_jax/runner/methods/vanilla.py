"""vanilla: normal steps only; with its baselines (each modality alone, late fusion, and
OGM-GE's authors' late fusion through one joint head)."""

from gml_jax.balancing import BalanceState
from gml_jax.runner.methods import Method


def _unimodal(modality: int):
  def edit(c):
    c.data.modalities, c.model.fusion = (modality,), "none"
  return edit


def _late_fusion(c):
  c.model.fusion = "none"


def _late_fusion_joint(c):  # one head over every branch's features, one fused loss
  c.model.fusion, c.model.head = "none", "joint"


METHOD = Method(
    name="vanilla",
    summary="normal steps only (the speeds are still measured where the model has fusion "
            "layers)",
    variants={"unimodal_0": _unimodal(0), "unimodal_1": _unimodal(1),
              "late_fusion": _late_fusion, "late_fusion_joint": _late_fusion_joint},
    comparisons=(("vanilla", "late_fusion"),),
    in_default_study=True,
    state_types=(BalanceState,),
    position=0,
)
