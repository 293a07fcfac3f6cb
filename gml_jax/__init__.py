"""gml_jax: balanced multi-modal learning in JAX/Flax (Wu et al., ICML 2022)."""

from gml_jax.balancing import (
    BalanceState,
    balance_state,
    balanced_multimodal,
    modality_speeds,
    rebalance_target,
    speed_gap,
    update_mask,
)
from gml_jax.fusion import MMTM
from gml_jax.models import (
    Branch,
    FusionNetwork,
    fusion_network,
    group_labels,
    resnet18_fusion,
    small_cnn_fusion,
)
from gml_jax.train import (
    TrainState,
    compile_eval_step,
    compile_train_step,
    create_train_state,
    data_mesh,
    make_eval_step,
    make_train_step,
    replicate,
    shard_batch,
)
from gml_jax.utilization import Utilization, conditional_utilization, squeeze_means

__version__ = "0.1.0"
