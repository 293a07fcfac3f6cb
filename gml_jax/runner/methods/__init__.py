"""The balancing methods the runner knows, found by name: each module here registers one.

A method is a unit: its library module (the optax transform, its state declaring what it
needs from the step and which metrics it reports: :mod:`gml_jax.extras`), one registration
here (a module ``<name>.py`` defining ``METHOD = Method(...)``: its config options with
defaults and checks, how it wraps the optimizer, its variants, its comparisons), its tests
and its docs page. The step, the trainer, the logs, the study, the report and the plots
learn nothing else about it (``docs/methods/adding_a_method.md`` walks through one).

Config: ``balance.method`` names the method; its options live under ``balance.<method>``
(e.g. ``balance.guided.alpha``), as a backbone's under ``model.<backbone>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import pkgutil
from typing import Any, Callable

import ml_collections
import optax

__all__ = ["Method", "Option", "Context", "get", "names", "variants", "variant_method",
           "comparisons", "LEGACY_FIELDS"]


@dataclasses.dataclass(frozen=True)
class Option:
  """One option of a method: ``balance.<method>.<name>``.

  Attributes:
    default: its value unless the experiment or the command line sets another.
    check: (test, what is expected), e.g. :func:`gml_jax.runner.fields.number`.
    help: what it means (shown in the docs and the config's comments).
  """

  default: Any
  check: tuple[Callable[[Any], bool], str]
  help: str = ""


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method's transform may depend on besides its options.

  Attributes:
    seed: the run's seed.
    steps_per_epoch: training steps per epoch (to turn epochs into steps).
    num_epochs: the run's epochs.
    num_modalities: N, the model's branches.
    labels: the model's group labels (``main:<k>``, ``fusion:<k>``, ``other``).
    encoder_labels: the same with each branch's heads, biases and normalisation ``other``.
    num_classes: the dataset's classes (None where the caller does not know them).
    feature_dims: a function returning D_k of every branch's sown features (measured
      abstractly from the model only when a method calls it; None: unknown).
  """

  seed: int
  steps_per_epoch: int
  num_epochs: int
  num_modalities: int
  labels: Any
  encoder_labels: Any
  num_classes: int | None = None
  feature_dims: Callable[[], tuple[int, ...]] | None = None


def _unchanged(inner, options, context):
  del options, context
  return inner


@dataclasses.dataclass(frozen=True)
class Method:
  """A balancing method as the runner sees it.

  Attributes:
    name: ``balance.method``'s value, and the default variant's name.
    summary: one line: what it does (help texts, docs).
    options: its options (``balance.<name>.<option>``), in order.
    transform: ``(inner, options, context) -> tx``: the optimizer wrapped with the method
      (``options`` is the run's ``balance.<name>`` section, a ConfigDict).
    rebalances: True when ``transform`` already holds :func:`gml_jax.balanced_multimodal`
      (the paper's methods, which need fusion layers); False: the runner wraps ``tx`` with
      it in method "vanilla" wherever the model has fusion layers, to measure the speeds.
    min_modalities: the fewest branches it works with.
    check: ``(options, num_modalities) -> None``: checks across its options and the model,
      raising ValueError naming the field; None: none.
    variants: variant name -> ``edit(config)``: the config changes that make the variant
      (after the method's defaults are set). The method's own name needs no entry.
    comparisons: (variant, baseline or control variant) pairs whose paired differences a
      study reports when it ran both.
    in_default_study: whether a study without ``--methods`` runs it.
    state_types: the library state classes whose METRICS it logs (the log's known keys).
    position: where it stands in lists and tables (smaller first; then by name).
    epoch_share: ``options -> float``: the share of the training split that the epoch
      pass of its transform reads (:mod:`gml_jax.epochs`; PMR's prototypes); None: all.
    loss: what the train step minimises (:data:`gml_jax.steps.LOSSES`), where the method
      prescribes it (MMPareto: ``"both"``); None: the model's (``build.loss``).
    own_variant: whether its name is a config variant too (False: only its variants are).
  """

  name: str
  summary: str
  options: dict[str, Option] = dataclasses.field(default_factory=dict)
  transform: Callable[[optax.GradientTransformation, Any, Context],
                      optax.GradientTransformation] = _unchanged
  rebalances: bool = False
  min_modalities: int = 1
  check: Callable[[Any, int], None] | None = None
  variants: dict[str, Callable[[ml_collections.ConfigDict], None]] = dataclasses.field(
      default_factory=dict)
  comparisons: tuple[tuple[str, str], ...] = ()
  in_default_study: bool = False
  state_types: tuple[type, ...] = ()
  position: int = 100
  own_variant: bool = True
  loss: str | None = None
  epoch_share: Callable[[Any], float] | None = None

  def defaults(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({k: o.default for k, o in self.options.items()})

  def check_options(self, section, num_modalities: int, cross_checks: bool = True) -> None:
    """Every option of ``section`` (``balance.<name>``): known (else "did you mean"), and
    its value passes its check; then (``cross_checks``) :attr:`check`."""
    from gml_jax.runner.failure import shorten

    for key in section:
      if key not in self.options:
        close = difflib.get_close_matches(key, self.options, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"config.balance.{self.name}.{key} is unknown: method {self.name!r} "
                         f"takes {list(self.options) or 'no options'}.{hint}")
    for key, option in self.options.items():
      test, expected = option.check
      value = section.get(key, option.default)
      if not test(value):
        what = "is unknown" if expected.startswith("one of") else "is invalid"
        raise ValueError(f"config.balance.{self.name}.{key}={shorten(repr(value))} {what}: "
                         f"expected {expected}.")
    if cross_checks and self.check is not None:
      self.check(section, num_modalities)


@functools.cache
def _registry() -> dict[str, Method]:
  found = {}
  for module in pkgutil.iter_modules(__path__):
    if module.name.startswith("_"):  # shared pieces, not methods
      continue
    method = importlib.import_module(f"{__name__}.{module.name}").METHOD
    if method.name != module.name:
      raise ValueError(f"{__name__}.{module.name} registers {method.name!r}; a method's "
                       "module is named after it.")
    found[method.name] = method
  return dict(sorted(found.items(), key=lambda item: (item[1].position, item[0])))


def names() -> tuple[str, ...]:
  """Every registered method's name (``balance.method``'s values)."""
  return tuple(_registry())


def get(name: str) -> Method:
  """The method registered as ``name``, or a ValueError naming the known ones."""
  if name not in _registry():
    close = difflib.get_close_matches(str(name), names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown balancing method {name!r}; expected one of {names()}.{hint}")
  return _registry()[name]


def variants() -> dict[str, str]:
  """Every config variant -> the method it runs: each method's own name, then its other
  variants, method by method."""
  out = {}
  for method in _registry().values():
    if method.own_variant:
      out[method.name] = method.name
    out |= {variant: method.name for variant in method.variants}
  return out


def variant_method(variant: str) -> Method:
  """The method that config variant ``variant`` runs (a ValueError when none has it)."""
  known = variants()
  if variant not in known:
    close = difflib.get_close_matches(str(variant), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown variant {variant!r}; expected one of {tuple(known)}.{hint}")
  return get(known[variant])


def comparisons() -> tuple[tuple[str, str], ...]:
  """Every registered (variant, baseline) pair, without repeats."""
  return tuple(dict.fromkeys(p for m in _registry().values() for p in m.comparisons))


# The flat fields of the layout before methods were units -> their field now.
LEGACY_FIELDS = {
    "alpha": "balance.guided.alpha", "window": "balance.<method>.window (guided, random, fixed)",
    "target": "balance.fixed.target", "random_shares": "balance.random.shares",
    "warmup_epochs": "balance.<method>.warmup_epochs (guided, random, fixed)",
    "update_mode": "balance.<method>.update_mode (guided, random, fixed)",
    "ogm_alpha": "balance.ogm_ge.alpha", "ogm_noise": "balance.ogm_ge.noise",
    "ogm_continuous": "balance.ogm_ge.continuous", "ogm_scope": "balance.ogm_ge.scope",
    "ogm_epochs": "balance.ogm_ge.epochs",
}
