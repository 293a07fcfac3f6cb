"""The runner's vocabulary, defined once: the methods and config variants, and every key the
runner writes (step rows of ``metrics/steps.jsonl``, epoch rows of ``metrics/epochs.jsonl``,
a run's ``summary.json``, a study's tables). Writers and readers both call these functions;
nothing parses a key back.

Per-branch values are keyed by the *dataset modality* the branch reads (``modality``: a
uni-modal run on modality 1 and a two-modality run mean the same "1"); a branch's position
in the model (``branch``) only picks its value out of an array.
"""

from __future__ import annotations

import itertools
from typing import Sequence

from gml_jax.balancing import METHODS

# ---- Methods (config.balance.method) and config variants (the part after ':' of --config).
BALANCE_METHODS = (*METHODS, "ogm_ge")  # the transform's, and OGM-GE (docs/methods/ogm_ge.md)
# Controls for guided's decision: guided's schedule pinned to modality k (no speed test), and
# random draws at guided's shares where its windows run back to back (Q/(Q+1) of the steps
# after warm-up re-balance m0, none m1; Q = 5).
CONTROLS = ("fixed_0", "fixed_1", "random_matched")
# Baselines: each modality alone, late fusion (no MMTM), and OGM-GE's authors' late fusion
# without modulation (one joint head, one cross-entropy on the fused output).
BASELINES = ("unimodal_0", "unimodal_1", "late_fusion", "late_fusion_joint")
JOINT_HEAD_VARIANTS = ("ogm_ge_joint", "late_fusion_joint")  # OGM-GE's authors' model
VARIANTS = (*(m for m in BALANCE_METHODS if m != "fixed"), "ogm_ge_joint", *CONTROLS,
            *BASELINES)
DEFAULT_VARIANT = "guided"  # of `--config experiments/<name>.py` alone, and of make train
STUDY_METHODS = ("vanilla", "random", "guided")  # a study's default --methods: the paper's

# ---- A step row: one per training step.
STEP = "step"
LOSS = "loss"  # what the step minimised
ACCURACY = "accuracy"  # of ŷ
TARGET = "target"  # the modality the step re-balanced (a branch index; -1: a normal step)
D_SPEED = "d_speed"


def branch_accuracy(modality: int) -> str:
  return f"branch_{modality}_accuracy"


def branch_loss(modality: int) -> str:
  return f"branch_{modality}_loss"


def speed(modality: int) -> str:
  """s_k, the conditional learning speed of the branch reading ``modality``."""
  return f"s_{modality}"


def mu_main(modality: int) -> str:
  return f"mu_main_{modality}"


def mu_fusion(modality: int) -> str:
  return f"mu_fusion_{modality}"


def ogm_ratio(modality: int) -> str:
  return f"ogm_ratio_{modality}"


def ogm_coefficient(modality: int) -> str:
  return f"ogm_coefficient_{modality}"


# A train step's scalar metrics -> the key of each in a row (the target is an integer).
SCALARS = {"loss": LOSS, "accuracy": ACCURACY, "target": TARGET, "d_speed": D_SPEED}
# A train step's per-branch metrics (arrays over branches) -> the key of each value.
PER_BRANCH = {"branch_accuracy": branch_accuracy, "branch_loss": branch_loss,
              "speeds": speed, "mu_main": mu_main, "mu_fusion": mu_fusion,
              "ogm_ratio": ogm_ratio, "ogm_coefficient": ogm_coefficient}


def step_keys(modalities: Sequence[int]) -> list[str]:
  """Every key a step row may have."""
  per_branch = [key(m) for m in modalities for key in PER_BRANCH.values()]
  return [STEP, LOSS, ACCURACY, TARGET, D_SPEED, *per_branch]


def averaged(modalities: Sequence[int]) -> list[str]:
  """The step-row keys an epoch row averages over the epoch's steps."""
  return [LOSS, ACCURACY, *(branch_accuracy(m) for m in modalities)]


def last_speeds(modalities: Sequence[int]) -> list[str]:
  """The step-row keys an epoch row takes from the epoch's last step."""
  return [D_SPEED, *(speed(m) for m in modalities)]


# ---- An epoch row: one per epoch end. Evaluation results (``examples``, ``accuracy``,
# ``loss``, ``branch_<m>_accuracy``) are named as in a step row.
EPOCH = "epoch"
LEARNING_RATE = "learning_rate"
EXAMPLES = "examples"


def evaluated(modalities: Sequence[int]) -> list[str]:
  """The keys of an evaluation over a split."""
  return [EXAMPLES, ACCURACY, LOSS, *(branch_accuracy(m) for m in modalities)]


def train(key: str) -> str:
  """An epoch row's mean of step-row ``key`` over the epoch."""
  return f"train_{key}"


def val(key: str) -> str:
  """An epoch row's validation value ``key``."""
  return f"val_{key}"


def utilization_keys(modalities: Sequence[int]) -> list[str]:
  """The keys of the utilization rates on a split (and d_util for two modalities)."""
  rates = [utilization(j, k) for j, k in utilization_pairs(modalities)]
  return [*rates, D_UTIL] if len(modalities) == 2 else rates


def epoch_keys(modalities: Sequence[int]) -> list[str]:
  """Every key an epoch row may have (the validation rates with utilization_every_epoch)."""
  return [EPOCH, STEP, *(train(k) for k in averaged(modalities)),
          *(val(k) for k in evaluated(modalities)), *last_speeds(modalities), LEARNING_RATE,
          *(val(k) for k in utilization_keys(modalities))]


# ---- A run's summary.
TEST_SPLITS = ("test", "test_biased")
MODALITIES = "modalities"
FUSION = "fusion"
D_UTIL = "d_util"
STEPS = "steps"
TRAIN_SECONDS = "train_seconds"
COMPILE_SECONDS = "compile_seconds"
SAMPLES_PER_S = "samples_per_s"
BEST_STEP = "best_step"
BEST_VAL_ACCURACY = "best_val_accuracy"
# Spearman's rank correlation of d_speed and the validation d_util over the run's epochs.
SPEED_UTIL_CORRELATION = "speed_util_spearman"
# What the run was (copied from its config and data).
DESCRIPTION = ("experiment", "method", "update", FUSION, MODALITIES, "data_source", "data")


def split(split_name: str, key: str) -> str:
  """The summary's value ``key`` of an evaluation (:func:`evaluated`) on a test split."""
  return f"{split_name}_{key}"


def utilization(j: int, k: int) -> str:
  """u(m_j | m_k) of dataset modalities j and k."""
  return f"u(m{j}|m{k})"


def utilization_pairs(modalities: Sequence[int]) -> list[tuple[int, int]]:
  """(j, k) of every rate, in the summary's order."""
  return list(itertools.permutations(modalities, 2))


def rebalance_share(modality: int) -> str:
  """The share of the run's steps that re-balanced the branch reading ``modality``."""
  return f"rebalance_share_m{modality}"


def summary_keys(modalities: Sequence[int]) -> list[str]:
  """Every key a run's summary may have."""
  evaluations = [split(s, k) for s in TEST_SPLITS for k in evaluated(modalities)
                 if k != LOSS]
  rates = [utilization(j, k) for j, k in utilization_pairs(modalities)]
  return [*DESCRIPTION, BEST_STEP, BEST_VAL_ACCURACY, *evaluations, *rates, D_UTIL,
          *(rebalance_share(m) for m in modalities), SPEED_UTIL_CORRELATION, STEPS,
          TRAIN_SECONDS, SAMPLES_PER_S, COMPILE_SECONDS]


# ---- A study's aggregate: the summary values it averages over seeds, in table order.


def study_metrics(modalities: Sequence[int]) -> list[str]:
  rates = [utilization(j, k) for k in modalities for j in modalities if j != k]
  return [split("test", ACCURACY), *(split("test", branch_accuracy(m)) for m in modalities),
          split("test_biased", ACCURACY), *rates, D_UTIL,
          *(rebalance_share(m) for m in modalities), SPEED_UTIL_CORRELATION, SAMPLES_PER_S]


def study_paired_metrics(modalities: Sequence[int]) -> list[str]:
  """The values whose paired differences over seeds a study reports."""
  return [split("test", ACCURACY), *(split("test", branch_accuracy(m)) for m in modalities),
          split("test_biased", ACCURACY), D_UTIL]
