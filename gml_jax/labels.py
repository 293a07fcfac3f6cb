"""Parameter-group labels: the language that tells the transforms which parameters are whose.

Every leaf of a model's parameters (and of its other collections: BatchNorm statistics,
the running means of :class:`gml_jax.CrossModalCut`) carries one label:

* ``"main:<k>"``: modality k's own branch, its classifier head included;
* ``"fusion:<k>"``: fusion parameters that feed branch k (e.g. MMTM's excitation into k, a
  FiLM generator that modulates branch k);
* ``"fusion:shared"``: fusion parameters shared by all modalities (MMTM's squeeze layer);
  they count in the fusion group of every modality;
* ``"other"``: never measured, and frozen in ``update="branch"`` re-balancing steps. Give it
  explicitly: :func:`label_rules` refuses a parameter that no rule names.

A label tree has the structure of the tree it labels. :func:`label_rules` builds one from
rules over each leaf's ``/``-joined path, the same for Linen variables, NNX state (the
``value`` attribute of NNX variables is not part of the path) and any other pytree.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax

Labels = Union[Any, Callable[[Any], Any]]
"""A label tree, or a function of the labelled tree that returns one (see module doc)."""

OTHER = "other"
SHARED = "fusion:shared"


def parse_label(label: str) -> tuple[str, int | None]:
  """Splits a group label into (kind, modality): ("main", k), ("fusion", k),
  ("shared", None) or ("other", None).

  >>> parse_label("fusion:1"), parse_label("fusion:shared")
  (('fusion', 1), ('shared', None))
  """
  if label == OTHER:
    return "other", None
  if label == SHARED:
    return "shared", None
  kind, _, index = str(label).partition(":")
  if kind in ("main", "fusion") and index.isdigit():
    return kind, int(index)
  raise ValueError(
      f"Unknown parameter-group label {label!r}; expected 'main:<k>', 'fusion:<k>', "
      "'fusion:shared' or 'other' (k a modality index 0, 1, ...)."
  )


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_string(path: Sequence[Any]) -> str:
  """The ``/``-joined names of a pytree key path (dict keys, attribute names, indices).

  The trailing ``value`` attribute of an NNX variable is dropped, so that Linen variables,
  NNX state and plain dicts of the same layout give the same string.

  >>> import jax.numpy as jnp
  >>> paths = jax.tree_util.tree_flatten_with_path({"audio": {"kernel": jnp.ones(2)}})[0]
  >>> path_string(paths[0][0])
  'audio/kernel'
  """
  keys = list(path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return "/".join(_key_name(k) for k in keys)


def label_rules(rules: Sequence[tuple[str, str]] | Mapping[str, str],
                context: str = "") -> Callable[[Any], Any]:
  r"""A label function from rules over ``/``-joined leaf paths.

  Each rule is ``(pattern, label)``: ``pattern`` is a regular expression that must match
  the whole path or a leading part of it that ends at a ``/`` (so ``"audio"`` covers
  ``audio/kernel`` and ``audio/bias`` but not ``audio_head/kernel``); ``label`` is a group
  label and may refer to the pattern's groups (``r"main:\1"``). The first rule that matches
  a leaf gives its label. A leaf that no rule matches is an error naming its path: map it
  to ``"other"`` explicitly if it should be neither measured nor re-balanced.

  The function works on Linen variable collections, NNX state and plain pytrees alike, so
  one set of rules labels the params and every other collection (BatchNorm statistics,
  fusion running means) of a model whose modules they name.

  Example::

    >>> import jax.numpy as jnp
    >>> labels = label_rules([(r"enc_(\d)", r"main:\1"), (r"head_(\d)", r"main:\1"),
    ...                       (r"film_(\d)", r"fusion:\1")])
    >>> params = {"enc_0": {"kernel": jnp.ones(2)}, "film_1": {"bias": jnp.ones(2)}}
    >>> labels(params)
    {'enc_0': {'kernel': 'main:0'}, 'film_1': {'bias': 'fusion:1'}}
    >>> labels({"extra": jnp.ones(2)})
    Traceback (most recent call last):
    ...
    ValueError: No label rule matches 'extra' ...

  Args:
    rules: ``(pattern, label)`` pairs in order, or a mapping ``{pattern: label}``.
    context: a sentence added to the error for an unmatched leaf (what the rules are for).

  Returns:
    A function of a pytree that returns its label tree (pass it as ``labels`` to
    :func:`gml_jax.balanced_multimodal`, :func:`gml_jax.ogm_ge` and the steps).
  """
  pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  compiled = []
  for rule in pairs:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2
            and all(isinstance(x, str) for x in rule)):
      raise ValueError(f"A label rule is a (pattern, label) pair of strings; got {rule!r}.")
    pattern, label = rule
    try:
      regex = re.compile(f"(?:{pattern})(?:/.*)?")
    except re.error as e:
      raise ValueError(f"Label rule pattern {pattern!r} is not a regular expression: {e}.") from e
    if "\\" not in label:
      parse_label(label)  # a fixed label is checked now; a template once it is filled
    compiled.append((pattern, regex, label))

  def label_of(path: str) -> str:
    for _pattern, regex, label in compiled:
      match = regex.fullmatch(path)
      if match:
        filled = match.expand(label)
        parse_label(filled)
        return filled
    raise ValueError(
        f"No label rule matches {path!r} (rules: {[p for p, _, _ in compiled]}). Add a rule "
        f"for it, or map it to 'other' explicitly (e.g. ({path.split('/')[0]!r}, 'other')) to "
        f"leave it unmeasured and frozen in re-balancing steps.{' ' + context if context else ''}"
    )

  def labels(tree: Any) -> Any:
    if not jax.tree_util.treedef_is_leaf(jax.tree.structure(tree)):
      return jax.tree_util.tree_map_with_path(lambda path, _: label_of(path_string(path)), tree)
    raise ValueError(
        f"The label rules got a single {type(tree).__name__}, not a tree of parameters. (Was "
        "the label function called as a schedule? optax.inject_hyperparams calls its callable "
        "arguments with the step count: do not wrap balanced_multimodal or ogm_ge in it; "
        "inject the hyperparameters into the inner optimizer and change them with "
        "gml_jax.set_hyperparams.)")

  return labels


def resolve_labels(labels: Labels, tree: Any) -> list[tuple[str, int | None]]:
  """The parsed label of every leaf of ``tree``, in leaf order; ``labels`` is a label tree
  with the structure of ``tree`` or a function that returns one."""
  if callable(labels):
    labels = labels(tree)
  label_leaves, label_def = jax.tree.flatten(labels)
  tree_def = jax.tree.structure(tree)
  if label_def != tree_def:
    raise ValueError(
        "The label tree does not have the structure of the tree it labels.\n"
        f"  labels: {str(label_def)[:500]}\n  tree:   {str(tree_def)[:500]}"
    )
  return [parse_label(label) for label in label_leaves]


def num_modalities(labels: Labels, tree: Any, fusion: bool = True) -> int:
  """Number of modalities named by ``labels``: N >= 2 main groups ``main:0`` ...
  ``main:<N-1>``; with ``fusion``, every modality must also have a fusion group."""
  parsed = resolve_labels(labels, tree)
  main = {k for kind, k in parsed if kind == "main"}
  if not main:
    raise ValueError("No parameter is labelled 'main:<k>': cannot tell the modalities apart.")
  n = max(main) + 1
  if n < 2 or main != set(range(n)):
    raise ValueError(
        f"Main groups found for modalities {sorted(main)}; expected 'main:0' ... "
        "'main:<N-1>' with N >= 2 modalities."
    )
  own_fusion = {k for kind, k in parsed if kind == "fusion"}
  if not own_fusion <= set(range(n)):
    raise ValueError(f"Fusion labels name modalities {sorted(own_fusion)}, but only {n} exist.")
  if not fusion:
    return n
  has_shared = any(kind == "shared" for kind, _ in parsed)
  missing = [k for k in range(n) if k not in own_fusion and not has_shared]
  if missing:
    raise ValueError(
        f"Modalities {missing} have no fusion parameters ('fusion:<k>' or 'fusion:shared'):"
        " the conditional learning speed needs both a main and a fusion group."
    )
  return n
