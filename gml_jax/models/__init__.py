"""Intermediate-fusion networks and the backbones they are built from.

:func:`build` makes the network of a backbone by name (the modules of
``gml_jax/models/backbones/``: ``small_cnn``, ``resnet18``, ``i3d``, ``mlp`` for feature
vectors, ``av_resnet18`` for a spectrogram and frames); the trainer, the
benchmarks and the tests all go through it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

from gml_jax.models import backbones
from gml_jax.models.network import (
  HEADS,
  Branch,
  FusionNetwork,
  JointHead,
  encoder_labels,
  fusion_network,
  group_labels,
)
from gml_jax.models.weights import load_branch_weights

__all__ = ["BACKBONES", "HEADS", "Branch", "FusionNetwork", "JointHead", "backbone",
           "backbone_defaults", "backbone_options", "build", "encoder_labels", "fusion_network",
           "group_labels", "i3d_fusion", "load_branch_weights", "resnet18_fusion",
           "small_cnn_fusion"]

# Every module of gml_jax/models/backbones/ (names starting with "_" are shared helpers).
BACKBONES = tuple(sorted(m.name for m in pkgutil.iter_modules(backbones.__path__)
                         if not m.name.startswith("_")))


def backbone(name: str) -> ModuleType:
  """The backbone module ``gml_jax.models.backbones.<name>``."""
  if name not in BACKBONES:
    raise ValueError(f"Unknown backbone {name!r}; expected one of {BACKBONES} "
                     "(modules of gml_jax/models/backbones/).")
  return importlib.import_module(f"{backbones.__name__}.{name}")


def backbone_options(name: str) -> tuple[str, ...]:
  """The options a backbone's ``stages()`` takes (e.g. ``width`` for ``small_cnn``)."""
  return tuple(backbone_defaults(name))


def backbone_defaults(name: str) -> dict:
  """The default of each option of a backbone's ``stages()``."""
  return {k: p.default for k, p in inspect.signature(backbone(name).stages).parameters.items()}


def build(name: str, num_classes: int, num_modalities: int = 2, *, ratio: float = 4.0,
          fusion: bool = True, head: str = "branch", **options) -> FusionNetwork:
  """N branches of backbone ``name`` with MMTM after its ``FUSION_AFTER`` stages
  (``fusion=False``: none, i.e. late fusion, or a uni-modal model for N = 1); ``head``:
  each branch's own (``"branch"``) or one over all of them (``"joint"``, see
  :class:`JointHead`).

  ``options`` go to the backbone's ``stages()`` (see :func:`backbone_options`).
  """
  module = backbone(name)
  return fusion_network(lambda: module.stages(**options), num_modalities, num_classes,
                        module.FUSION_AFTER if fusion else (), ratio=ratio, head=head)


def small_cnn_fusion(num_classes: int = 10, num_modalities: int = 2, width: int = 32):
  """The Colored MNIST model (§5): small CNN branches, MMTM after stages 2 and 3."""
  return build("small_cnn", num_classes, num_modalities, width=width)


def resnet18_fusion(num_classes: int = 40, num_modalities: int = 2):
  """The ModelNet40 model (§5): ResNet-18 branches, MMTM after layer2, layer3, layer4."""
  return build("resnet18", num_classes, num_modalities)


def i3d_fusion(num_classes: int = 25, num_modalities: int = 2):
  """The NVGesture model: I3D branches, MMTM after Mixed_4f, Mixed_5b and Mixed_5c."""
  return build("i3d", num_classes, num_modalities)
