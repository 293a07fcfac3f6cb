"""Intermediate-fusion networks: N uni-modal branches with MMTM between their stages.

A :class:`FusionNetwork` runs stage s of every branch, then (if s is in ``fusion_after``)
an MMTM over the branches' feature maps, and so on; each branch ends in global average
pooling and its own linear head. It returns the per-branch logits ŷ_k and their mean ŷ.
With ``head="joint"`` (late fusion as OGM-GE's authors build it) one linear head reads the
concatenated pooled features instead, and ŷ_k is modality k's share of it.

Variable layout (every collection follows it, which is what :func:`group_labels` reads):

* ``branches_<k>``: branch k's stages (``stages_<s>``) and head (``head``): group main_k;
* ``fusion_<i>``: the i-th MMTM: ``squeeze`` is fusion:shared, ``excite_<k>`` and the
  running means of its cut ``cut_<k>`` belong to fusion_k;
* ``head``: the joint head (``head="joint"``): other (no branch's alone).

Applied with ``mutable=["intermediates"]``, the network also sows its branches' pooled
features, a tuple of N arrays [B, D_k], as ``("intermediates", "features")``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gml_jax.fusion import MMTM
from gml_jax.labels import OTHER, SHARED, label_rules

HEADS = ("branch", "joint")


class Branch(nn.Module):
  """One uni-modal branch: a sequence of stages, then pooling and a linear head.

  Every stage is a module called as ``stage(x, train=...)``.
  """

  stages: Sequence[nn.Module]
  num_classes: int

  def setup(self):
    self.head = nn.Dense(self.num_classes)

  def stage(self, index: int, x: jax.Array, train: bool) -> jax.Array:
    return self.stages[index](x, train=train)

  def logits(self, x: jax.Array) -> jax.Array:
    return self.head(pooled(x))


def pooled(x: jax.Array) -> jax.Array:
  """Global average pooling: [B, ..., C] -> [B, C]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


class JointHead(nn.Module):
  """One linear head over the concatenation of N modalities' features (OGM-GE's late
  fusion): ŷ = [f_0, ..., f_{N-1}] W + b, and modality k's share of it
  ŷ_k = f_k W_k + b / N, with W_k the rows of W that read f_k (the authors' "half the
  weight, half the bias" for two modalities). The shares add up to ŷ.

  Parameters as ``nn.Dense`` names them: ``kernel`` [Σ_k D_k, classes], ``bias``.
  """

  num_classes: int

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """features: N arrays [B, D_k] -> (ŷ [B, classes], ŷ_k stacked [N, B, classes])."""
    sizes = [f.shape[-1] for f in features]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (sum(sizes), self.num_classes), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.num_classes,), jnp.float32)
    dtype = jnp.result_type(*features)
    kernel, bias = kernel.astype(dtype), bias.astype(dtype)
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    shares = jnp.stack([f @ kernel[s:s + d] + bias / len(features)
                        for f, s, d in zip(features, starts, sizes)])
    return jnp.sum(shares, axis=0), shares


class FusionNetwork(nn.Module):
  """N branches with MMTM fusion after the stages listed in ``fusion_after``.

  With no fusion stages it is a late-fusion model (ŷ is the mean of independent branches'
  logits), and with one branch and none, a uni-modal model.

  Attributes:
    branches: one :class:`Branch` per modality, all with the same number of stages
      (two or more when ``fusion_after`` is not empty).
    fusion_after: indices of the stages followed by an MMTM (0-based).
    ratio: MMTM squeeze ratio.
    head: ``"branch"`` (each branch's own head; ŷ is the mean of their logits) or
      ``"joint"`` (one :class:`JointHead` over every branch's pooled features; ŷ is its
      output, the branches' logits are their shares of it).
  """

  branches: Sequence[Branch]
  fusion_after: Sequence[int]
  ratio: float = 4
  head: str = "branch"

  @staticmethod
  def labels(tree: Any) -> Any:
    """The groups of its variables (:func:`group_labels`), read by the library's steps."""
    return group_labels(tree)

  def setup(self):
    depths = {len(b.stages) for b in self.branches}
    fewest = 2 if self.fusion_after else 1
    if len(self.branches) < fewest or len(depths) != 1:
      raise ValueError(
          f"FusionNetwork needs >= {fewest} branches with equal numbers of stages; got stage "
          f"counts {[len(b.stages) for b in self.branches]}."
      )
    (depth,) = depths
    if sorted(set(self.fusion_after)) != list(self.fusion_after) or not all(
        0 <= s < depth for s in self.fusion_after
    ):
      raise ValueError(
          f"fusion_after must list increasing stage indices in [0, {depth}); got "
          f"{list(self.fusion_after)}."
      )
    if self.head not in HEADS:
      raise ValueError(f"FusionNetwork: head must be one of {HEADS}, got {self.head!r}.")
    # Linen names the branches `branches_<k>`; group_labels relies on that layout.
    self.fusions = [
        MMTM(ratio=self.ratio, name=f"fusion_{i}") for i in range(len(self.fusion_after))
    ]
    if self.head == "joint":
      self.joint_head = JointHead(self.branches[0].num_classes, name="head")

  def __call__(
      self,
      inputs: Sequence[jax.Array],
      *,
      train: bool,
      cut: jax.Array | int = -1,
      drop: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """Returns (ŷ [B, classes], ŷ_k stacked as [N, B, classes]).

    ``cut`` and ``drop`` are passed to every MMTM (see :class:`gml_jax.fusion.MMTM`).
    """
    if len(inputs) != len(self.branches):
      raise ValueError(f"Expected {len(self.branches)} modality inputs, got {len(inputs)}.")
    xs = list(inputs)
    fusion_at = dict(zip(self.fusion_after, self.fusions))
    for s in range(len(self.branches[0].stages)):
      xs = [b.stage(s, x, train) for b, x in zip(self.branches, xs)]
      if s in fusion_at:
        xs = list(fusion_at[s](xs, train=train, cut=cut, drop=drop))
    # Each branch's pooled features, for methods that need them (PMR's prototypes; see
    # gml_jax.pmr.sown_features); a no-op unless 'intermediates' is mutable.
    self.sow("intermediates", "features", tuple(pooled(x) for x in xs))
    if self.head == "joint":
      return self.joint_head([pooled(x) for x in xs])
    branch_logits = jnp.stack([b.logits(x) for b, x in zip(self.branches, xs)])
    return jnp.mean(branch_logits, axis=0), branch_logits


_FUSION_NETWORK_RULES = [
    (r"branches_(\d+)", r"main:\1"),
    (r"fusion_\d+/squeeze", SHARED),
    (r"fusion_\d+/(?:excite|cut|drop)_(\d+)", r"fusion:\1"),
    (r"head", OTHER),
]
_CONTEXT = ("gml_jax.group_labels knows the layout of gml_jax's FusionNetwork only; label "
            "your own model with gml_jax.label_rules.")
_FUSION_NETWORK_LABELS = label_rules(_FUSION_NETWORK_RULES, context=_CONTEXT)
_ENCODER_LABELS = label_rules([(r"branches_\d+/head", OTHER), *_FUSION_NETWORK_RULES],
                              context=_CONTEXT)


def group_labels(tree: Any) -> Any:
  """Labels every leaf of a :class:`FusionNetwork` variable collection with its group.

  Works on ``params``, ``batch_stats`` and ``fusion_stats`` alike, from the network's
  layout (module names it creates itself), as :func:`gml_jax.label_rules`:
  ``branches_<k>`` -> ``main:<k>``; inside ``fusion_<i>``: ``squeeze`` -> ``fusion:shared``,
  ``excite_<k>`` and the cut ``cut_<k>`` (its running means) -> ``fusion:<k>``; the joint
  ``head`` -> ``other``. Any other path is an error naming it.
  """
  return _FUSION_NETWORK_LABELS(tree)


def encoder_labels(tree: Any) -> Any:
  """:func:`group_labels` with each branch's own head labelled ``other``: ``main:<k>`` is
  then branch k's encoder alone (what OGM-GE's authors modulate)."""
  return _ENCODER_LABELS(tree)


def fusion_network(
    stages_fn: Callable[[], Sequence[nn.Module]],
    num_modalities: int,
    num_classes: int,
    fusion_after: Sequence[int],
    ratio: float = 4,
    head: str = "branch",
) -> FusionNetwork:
  """N branches built by ``stages_fn`` (called once per branch)."""
  return FusionNetwork(
      branches=[Branch(tuple(stages_fn()), num_classes) for _ in range(num_modalities)],
      fusion_after=tuple(fusion_after),
      ratio=ratio,
      head=head,
  )
