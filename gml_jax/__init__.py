"""gml_jax: balanced multi-modal learning in JAX/Flax (Wu et al., ICML 2022).

The library: the balancing optax transform (``balancing``), OGM-GE, a second balancing
transform (``modulation``), MMTM fusion (``fusion``),
fusion networks and their backbones (``models``), pure data-parallel train and eval steps
(``steps``) and the conditional utilization rate (``utilization``). It needs only jax,
flax, optax, chex and numpy. The experiment runner (CLI, trainer, input pipeline, plots)
is ``gml_jax.runner``, installed with the ``experiments`` extra and run from a clone.
"""

from gml_jax.balancing import (
    METHODS,
    BalanceState,
    balance_state,
    balanced_multimodal,
    find_balance_state,
    modality_speeds,
    rebalance_target,
    speed_gap,
    update_mask,
)
from gml_jax.fusion import MMTM
from gml_jax.modulation import OGMState, discrepancy_ratios, modulation_coefficients, ogm_ge
from gml_jax.models import (
    Branch,
    FusionNetwork,
    fusion_network,
    group_labels,
    resnet18_fusion,
    small_cnn_fusion,
)
from gml_jax.steps import (
    TrainState,
    compile_eval_step,
    compile_train_step,
    create_train_state,
    data_mesh,
    make_eval_step,
    make_train_step,
    replicate,
    shard_batch,
    true_class_scores,
)
from gml_jax.utilization import Utilization, conditional_utilization, squeeze_means

__version__ = "0.2.0"
