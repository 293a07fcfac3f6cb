"""gml_jax: balanced multi-modal learning in JAX/Flax (Wu et al., ICML 2022).

The library: the balancing optax transform (``balancing``), OGM-GE, a second balancing
transform (``modulation``), the label language of both (``labels``), the cut for any fusion
and MMTM fusion (``fusion``; NNX twins in ``gml_jax.nnx``), fusion networks and their
backbones (``models``), pure train and eval steps (``steps``) for any model that follows
the model protocol (``protocol``), data parallelism for them (``parallel``: mesh,
replication, batch sharding, compilation), the step protocol by which a transform says what
its update needs from the step (``extras``), and the conditional utilization rate
(``utilization``). It needs only jax, flax, optax and numpy. The experiment runner (CLI,
trainer, input pipeline, plots) is ``gml_jax.runner``, installed with the ``experiments``
extra and run from a clone.
"""

import importlib
import sys

# The field's methods, as modules (gml_jax.agm.agm, ...): a function of the module's name
# exported here would hide the module.
from gml_jax import agm, epochs, inforeg, mmpareto, pmr
from gml_jax.agm import AGMState, agm_state, mono_modal_losses, shapley_losses
from gml_jax.balancing import (
    METHODS,
    UPDATE_MODES,
    BalanceState,
    StepMode,
    balance_state,
    balanced_multimodal,
    check_masking,
    describe_speeds,
    find_balance_state,
    group_sizes,
    keep_frozen,
    modality_speeds,
    rebalance_target,
    set_hyperparams,
    speed_gap,
    speed_warnings,
    step_mode,
    update_mask,
)
from gml_jax.epochs import EPOCH_INPUTS, epoch_needs, epoch_start
from gml_jax.extras import (
    EXTRA_ARGS,
    LOSS_ARGS,
    StepPass,
    extra_args,
    loss_needs_of,
    loss_terms,
    needs_of,
)
from gml_jax.fusion import MMTM, CrossModalCut
from gml_jax.inforeg import InfoRegState, inforeg_state
from gml_jax.labels import label_rules, parse_label, path_string
from gml_jax.mmpareto import MMParetoState, mmpareto_state
from gml_jax.models import (
    Branch,
    FusionNetwork,
    fusion_network,
    group_labels,
    i3d_fusion,
    resnet18_fusion,
    small_cnn_fusion,
)
from gml_jax.modulation import (
    OGMState,
    discrepancy_ratios,
    modulation_coefficients,
    ogm_ge,
    ogm_state,
)
from gml_jax.parallel import (
    compile_eval_step,
    compile_train_step,
    data_mesh,
    replicate,
    shard_batch,
)
from gml_jax.pmr import (
    PMRState,
    PrototypeSums,
    make_prototype_step,
    pmr_loss,
    pmr_state,
    prototype_pass,
    sown_features,
)
from gml_jax.protocol import MultiModalModel
from gml_jax.steps import (
    TrainState,
    create_train_state,
    make_eval_step,
    make_train_step,
    true_class_scores,
)
from gml_jax.utilization import Utilization, conditional_utilization, training_means

__version__ = "0.3.0"

__all__ = [
    # the balancing transform (balancing)
    "balanced_multimodal", "BalanceState", "METHODS", "UPDATE_MODES", "rebalance_target",
    "modality_speeds", "speed_gap", "balance_state", "find_balance_state", "update_mask",
    # a hand-written step, checks and guidance
    "StepMode", "step_mode", "keep_frozen", "check_masking", "speed_warnings",
    "describe_speeds", "group_sizes", "set_hyperparams",
    # labels
    "label_rules", "parse_label", "path_string", "group_labels",
    # OGM-GE (modulation)
    "ogm_ge", "OGMState", "ogm_state", "discrepancy_ratios", "modulation_coefficients",
    # fusion and models
    "CrossModalCut", "MMTM", "Branch", "FusionNetwork", "fusion_network",
    "small_cnn_fusion", "resnet18_fusion", "i3d_fusion",
    # steps and the model protocol
    "MultiModalModel", "TrainState", "create_train_state", "make_train_step",
    "make_eval_step", "true_class_scores",
    # the step protocol (extras): what a transform needs from the step
    "EXTRA_ARGS", "needs_of", "extra_args", "StepPass", "LOSS_ARGS", "loss_needs_of",
    "loss_terms",
    # the epoch hook (epochs): state that changes at epoch boundaries
    "EPOCH_INPUTS", "epoch_needs", "epoch_start",
    # the field's methods: AGM, MMPareto, PMR, InfoReg (their modules: gml_jax.agm.agm, ...)
    "epochs", "agm", "AGMState", "agm_state", "mono_modal_losses", "shapley_losses",
    "mmpareto", "MMParetoState", "mmpareto_state",
    "pmr", "PMRState", "pmr_state", "pmr_loss", "PrototypeSums", "make_prototype_step",
    "prototype_pass", "sown_features",
    "inforeg", "InfoRegState", "inforeg_state",
    # data parallelism (parallel)
    "data_mesh", "replicate", "shard_batch", "compile_train_step", "compile_eval_step",
    # utilization
    "conditional_utilization", "training_means", "Utilization",
]


class _RunnerFromAClone:
  """Where ``gml_jax.runner`` is not installed (the wheel holds the library alone), its
  import fails with one line saying where the runner comes from, not a bare
  ModuleNotFoundError. Last on ``sys.meta_path``: asked only when no other finder has it."""

  def find_spec(self, name, path=None, target=None):
    if name == "gml_jax.runner" or name.startswith("gml_jax.runner."):
      raise ModuleNotFoundError(
          "gml_jax.runner is not installed: the wheel holds the library alone. The experiment "
          "runner runs from a clone of the repository, with the 'experiments' extra: "
          "pip install -e '.[experiments]' in the clone (or: make install).", name=name)
    return None


if not any(type(f).__name__ == "_RunnerFromAClone" for f in sys.meta_path):
  sys.meta_path.append(_RunnerFromAClone())


def __getattr__(name):
  # gml_jax.nnx imports flax.nnx (a second of start-up): only for those who use it.
  if name == "nnx":
    return importlib.import_module("gml_jax.nnx")
  raise AttributeError(f"module 'gml_jax' has no attribute {name!r}")
