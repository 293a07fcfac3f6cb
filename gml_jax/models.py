"""Intermediate-fusion networks: N uni-modal branches with MMTM between their stages.

A :class:`FusionNetwork` runs stage s of every branch, then (if s is in ``fusion_after``)
an MMTM over the branches' feature maps, and so on; each branch ends in global average
pooling and its own linear head. It returns the per-branch logits ŷ_k and their mean ŷ.

Variable layout (every collection follows it, which is what :func:`group_labels` reads):

* ``branches_<k>``: branch k's stages (``stages_<s>``) and head (``head``): group main_k;
* ``fusion_<i>``: the i-th MMTM: ``squeeze`` is fusion:shared, ``excite_<k>`` and the
  running means ``excitation_*_<k>`` belong to fusion_k.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gml_jax.fusion import MMTM

# --------------------------------------------------------------------------------------
# The generic network


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
    return self.head(jnp.mean(x, axis=tuple(range(1, x.ndim - 1))))


class FusionNetwork(nn.Module):
  """N branches with MMTM fusion after the stages listed in ``fusion_after``.

  Attributes:
    branches: one :class:`Branch` per modality, all with the same number of stages.
    fusion_after: indices of the stages followed by an MMTM (0-based).
    ratio: MMTM squeeze ratio.
  """

  branches: Sequence[Branch]
  fusion_after: Sequence[int]
  ratio: float = 4

  def setup(self):
    depths = {len(b.stages) for b in self.branches}
    if len(self.branches) < 2 or len(depths) != 1:
      raise ValueError(
          f"FusionNetwork needs >= 2 branches with equal numbers of stages; got stage counts "
          f"{[len(b.stages) for b in self.branches]}."
      )
    (depth,) = depths
    if sorted(set(self.fusion_after)) != list(self.fusion_after) or not all(
        0 <= s < depth for s in self.fusion_after
    ):
      raise ValueError(
          f"fusion_after must list increasing stage indices in [0, {depth}); got "
          f"{list(self.fusion_after)}."
      )
    # Linen names the branches `branches_<k>`; group_labels relies on that layout.
    self.fusions = [
        MMTM(ratio=self.ratio, name=f"fusion_{i}") for i in range(len(self.fusion_after))
    ]

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
    branch_logits = jnp.stack([b.logits(x) for b, x in zip(self.branches, xs)])
    return jnp.mean(branch_logits, axis=0), branch_logits


def group_labels(tree: Any) -> Any:
  """Labels every leaf of a :class:`FusionNetwork` variable collection with its group.

  Works on ``params``, ``batch_stats`` and ``fusion_stats`` alike, from the network's
  layout (module names it creates itself, matched exactly): ``branches_<k>`` -> ``main:<k>``;
  inside ``fusion_<i>``: ``squeeze`` -> ``fusion:shared``, ``excite_<k>``,
  ``excitation_mean_<k>`` and ``excitation_count_<k>`` -> ``fusion:<k>``. Anything else is
  ``other``.
  """

  def fusion_label(name: str) -> str:
    if name == "squeeze":
      return "fusion:shared"
    for prefix in ("excite_", "excitation_mean_", "excitation_count_"):
      index = name[len(prefix):]
      if name.startswith(prefix) and index.isdigit():
        return f"fusion:{index}"
    return "other"

  def label(top: str, sub: str | None) -> str:
    if top.startswith("branches_") and top[len("branches_"):].isdigit():
      return f"main:{top[len('branches_'):]}"
    if top.startswith("fusion_") and top[len("fusion_"):].isdigit() and sub is not None:
      return fusion_label(sub)
    return "other"

  def by_path(path, _):
    keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    return label(str(keys[0]), str(keys[1]) if len(keys) > 1 else None)

  return jax.tree_util.tree_map_with_path(by_path, tree)


# --------------------------------------------------------------------------------------
# Stages


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2, as a max of four strided slices (XLA:CPU lowers
  ``reduce_window`` and its gradient slowly; this form is about twice as fast there)."""
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  x = x[:, :h, :w]
  return jnp.maximum(
      jnp.maximum(x[:, 0::2, 0::2], x[:, 1::2, 0::2]),
      jnp.maximum(x[:, 0::2, 1::2], x[:, 1::2, 1::2]),
  )


class ConvBNReLU(nn.Module):
  """Convolution (no bias), BatchNorm, ReLU."""

  features: int
  kernel: int = 3
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(
        self.features, (self.kernel, self.kernel), strides=self.strides, padding="SAME",
        use_bias=False,
    )(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.relu(x)


class CNNStage(nn.Module):
  """A stage of the small CNN: ConvBNReLU layers given as (features, kernel, strides),
  with optional 2x2 max pooling after the first layer."""

  layers: Sequence[tuple[int, int, int]]
  pool_after_first: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, (features, kernel, strides) in enumerate(self.layers):
      x = ConvBNReLU(features, kernel, strides)(x, train)
      if i == 0 and self.pool_after_first:
        x = max_pool_2x2(x)
    return x


def small_cnn_stages(width: int = 32) -> list[nn.Module]:
  """The Colored MNIST branch of the spec (§5), in three stages:
  [conv5x5-w, BN, ReLU, maxpool2, conv3x3-w, BN, ReLU], [conv3x3-2w stride 2, BN, ReLU],
  [conv3x3-2w, BN, ReLU]."""
  return [
      CNNStage(((width, 5, 1), (width, 3, 1)), pool_after_first=True),
      CNNStage(((2 * width, 3, 2),)),
      CNNStage(((2 * width, 3, 1),)),
  ]


class ResNetStem(nn.Module):
  """conv7x7-64 stride 2, BN, ReLU, 3x3 max pooling stride 2."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = ConvBNReLU(64, 7, 2)(x, train)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 convolutions with a residual connection."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = ConvBNReLU(self.features, 3, self.strides)(x, train)
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.relu(x + y)


class ResNetLayer(nn.Module):
  """A ResNet layer: ``blocks`` basic blocks, the first with stride ``strides``."""

  features: int
  blocks: int = 2
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.blocks):
      x = BasicBlock(self.features, self.strides if i == 0 else 1)(x, train)
    return x


def resnet18_stages() -> list[nn.Module]:
  """ResNet-18 (He et al. 2016) as five stages: stem, layer1 ... layer4."""
  return [
      ResNetStem(),
      ResNetLayer(64),
      ResNetLayer(128, strides=2),
      ResNetLayer(256, strides=2),
      ResNetLayer(512, strides=2),
  ]


class Unit3D(nn.Module):
  """3-D convolution (no bias), BatchNorm, ReLU: the unit of I3D."""

  features: int
  kernel: tuple[int, int, int] = (1, 1, 1)
  strides: tuple[int, int, int] = (1, 1, 1)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.features, self.kernel, strides=self.strides, padding="SAME",
                use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3)(x)
    return nn.relu(x)


class InceptionBlock(nn.Module):
  """I3D's Inception module; ``features`` = (1x1, 3x3 reduce, 3x3, 3x3 reduce, 3x3, pool
  projection), as in Carreira & Zisserman (2017)."""

  features: tuple[int, int, int, int, int, int]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    a, b_reduce, b, c_reduce, c, pool = self.features
    branch_a = Unit3D(a)(x, train)
    branch_b = Unit3D(b, (3, 3, 3))(Unit3D(b_reduce)(x, train), train)
    branch_c = Unit3D(c, (3, 3, 3))(Unit3D(c_reduce)(x, train), train)
    pooled = nn.max_pool(x, (3, 3, 3), strides=(1, 1, 1), padding="SAME")
    return jnp.concatenate([branch_a, branch_b, branch_c, Unit3D(pool)(pooled, train)], -1)


class I3DStage(nn.Module):
  """Optional 3-D max pooling, then Inception modules."""

  blocks: Sequence[tuple[int, ...]]
  pool: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.pool is not None:
      x = nn.max_pool(x, self.pool[0], strides=self.pool[1], padding="SAME")
    for features in self.blocks:
      x = InceptionBlock(tuple(features))(x, train)
    return x


class I3DStem(nn.Module):
  """conv 7x7x7-64 /2, pool 1x3x3 /1x2x2, conv 1x1x1-64, conv 3x3x3-192, pool 1x3x3."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Unit3D(64, (7, 7, 7), (2, 2, 2))(x, train)
    x = nn.max_pool(x, (1, 3, 3), strides=(1, 2, 2), padding="SAME")
    x = Unit3D(64)(x, train)
    x = Unit3D(192, (3, 3, 3))(x, train)
    return nn.max_pool(x, (1, 3, 3), strides=(1, 2, 2), padding="SAME")


I3D_BLOCKS = {  # Inception modules of I3D, by name
    "3b": (64, 96, 128, 16, 32, 32), "3c": (128, 128, 192, 32, 96, 64),
    "4b": (192, 96, 208, 16, 48, 64), "4c": (160, 112, 224, 24, 64, 64),
    "4d": (128, 128, 256, 24, 64, 64), "4e": (112, 144, 288, 32, 64, 64),
    "4f": (256, 160, 320, 32, 128, 128), "5b": (256, 160, 320, 32, 128, 128),
    "5c": (384, 192, 384, 48, 128, 128),
}


def i3d_stages() -> list[nn.Module]:
  """I3D (Inception-v1 inflated to 3-D) as six stages; the last three end in Mixed_4f,
  Mixed_5b and Mixed_5c, where the gesture model fuses."""
  b = I3D_BLOCKS
  return [
      I3DStem(),
      I3DStage((b["3b"], b["3c"])),
      I3DStage((b["4b"], b["4c"], b["4d"], b["4e"]), pool=((3, 3, 3), (2, 2, 2))),
      I3DStage((b["4f"],)),
      I3DStage((b["5b"],), pool=((2, 2, 2), (2, 2, 2))),
      I3DStage((b["5c"],)),
  ]


# --------------------------------------------------------------------------------------
# Ready-made networks


def fusion_network(
    stages_fn: Callable[[], Sequence[nn.Module]],
    num_modalities: int,
    num_classes: int,
    fusion_after: Sequence[int],
    ratio: float = 4,
) -> FusionNetwork:
  """N branches built by ``stages_fn`` (called once per branch)."""
  return FusionNetwork(
      branches=[Branch(tuple(stages_fn()), num_classes) for _ in range(num_modalities)],
      fusion_after=tuple(fusion_after),
      ratio=ratio,
  )


def small_cnn_fusion(num_classes: int = 10, num_modalities: int = 2, width: int = 32):
  """The Colored MNIST model (§5): small CNN branches, MMTM after stages 2 and 3."""
  return fusion_network(
      lambda: small_cnn_stages(width), num_modalities, num_classes, fusion_after=(1, 2)
  )


def i3d_fusion(num_classes: int = 25, num_modalities: int = 2):
  """The NVGesture model: I3D branches, MMTM after Mixed_4f, Mixed_5b and Mixed_5c."""
  return fusion_network(i3d_stages, num_modalities, num_classes, fusion_after=(3, 4, 5))


def resnet18_fusion(num_classes: int = 40, num_modalities: int = 2):
  """The ModelNet40 model (§5): ResNet-18 branches, MMTM after layer2, layer3, layer4."""
  return fusion_network(resnet18_stages, num_modalities, num_classes, fusion_after=(2, 3, 4))


# --------------------------------------------------------------------------------------
# Converted weights


def load_branch_weights(variables: dict, branch: int, path) -> dict:
  """Loads converted weights (e.g. Kinetics-pretrained I3D) into branch ``branch``.

  ``path`` is an ``.npz`` file whose keys are ``<collection>/<path inside the branch>``,
  e.g. ``params/stages_0/Unit3D_0/Conv_0/kernel`` or
  ``batch_stats/stages_0/Unit3D_0/BatchNorm_0/mean``. Every parameter and statistic of the
  branch but its classifier ``head`` must be in the file with its shape; the one exception
  is a first convolution trained on another number of input channels (RGB weights for a
  depth branch), whose kernel is averaged over its input channels and repeated. Returns new
  variables; the others are untouched.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Pretrained weights file {path} does not exist.")
  data = np.load(path)
  name = f"branches_{branch}"
  out = {col: dict(tree) for col, tree in variables.items()}
  expected = set()
  for col in ("params", "batch_stats"):
    if name not in variables.get(col, {}):
      continue
    flat = traverse_util.flatten_dict(variables[col][name], sep="/")
    keys = {f"{col}/{k}": k for k in flat if not k.startswith("head/")}
    expected |= set(keys)
    missing = sorted(k for k in keys if k not in data.files)
    if missing:
      raise ValueError(f"{path} lacks {len(missing)} weights of branch {branch}, e.g. "
                       f"{missing[:3]}; expected keys like {sorted(keys)[:2]}.")
    new = dict(flat)
    for key, inner in keys.items():
      new[inner] = _fit(data[key], flat[inner].shape, f"{path}:{key}")
    out[col][name] = traverse_util.unflatten_dict(new, sep="/")
  unexpected = sorted(set(data.files) - expected)
  unexpected = [k for k in unexpected if "/head/" not in f"/{k.split('/', 1)[-1]}"]
  if unexpected:
    raise ValueError(f"{path} has weights that branch {branch} does not: {unexpected[:3]}.")
  return out


def _fit(weight: np.ndarray, shape: tuple, where: str) -> jnp.ndarray:
  if weight.shape == tuple(shape):
    return jnp.asarray(weight)
  same_but_input = (weight.ndim == len(shape) >= 3 and weight.shape[:-2] == tuple(shape[:-2])
                    and weight.shape[-1] == shape[-1])
  if not same_but_input:
    raise ValueError(f"{where}: shape {weight.shape} does not fit {tuple(shape)}.")
  averaged = weight.mean(axis=-2, keepdims=True)
  return jnp.asarray(np.repeat(averaged, shape[-2], axis=-2))
