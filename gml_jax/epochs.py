"""The epoch hook: state that changes at epoch boundaries, for PMR and InfoReg.

Some balancing methods keep state that a train step cannot compute from one batch: PMR's
class prototypes (a pass over training data every epoch, :mod:`gml_jax.pmr`) and InfoReg's
epoch-start parameters and per-epoch information trace (:mod:`gml_jax.inforeg`). Their
state classes (NamedTuples inside the optimizer state) declare, as class attributes,

* ``EPOCH_NEEDS``: the names of what their ``epoch_start(**inputs)`` method needs, from
  :data:`EPOCH_INPUTS`;
* ``epoch_start(self, **inputs) -> state``: a pure function (jit-able) that returns the
  state for the epoch about to begin.

A trainer calls :func:`epoch_start` once **before every epoch, the first included**,
after the previous epoch's last update and before the next epoch's first one::

  needs = gml_jax.epochs.epoch_needs(state.opt_state)          # a tuple of names
  inputs = {}
  if "params" in needs:
    inputs["params"] = state.params
  if "prototype_sums" in needs:                                  # PMR's data pass
    inputs["prototype_sums"] = gml_jax.pmr.prototype_pass(proto_step, state, batches)
  state = state.replace(opt_state=gml_jax.epochs.epoch_start(state.opt_state, **inputs))

Each state counts the calls itself (its ``epochs_started`` field), so the hook takes no
epoch number and a run resumed from a checkpoint taken between epochs continues exactly.
A state with no epoch hook is left as it is.
"""

from __future__ import annotations

from typing import Any

import jax

EPOCH_INPUTS = ("params", "prototype_sums")
"""What an epoch hook may need: ``params``, the model parameters as the epoch begins
(InfoReg's anchor); ``prototype_sums``, a :class:`gml_jax.pmr.PrototypeSums` from a pass
over training data with those parameters (PMR's prototypes)."""


def _has_hook(node: Any) -> bool:
  return isinstance(node, tuple) and hasattr(type(node), "EPOCH_NEEDS") and hasattr(
      node, "epoch_start")


def _hooked(opt_state: Any) -> list:
  found = []

  def visit(node) -> bool:
    if _has_hook(node):
      found.append(node)
      return True
    return False

  jax.tree.leaves(opt_state, is_leaf=visit)
  return found


def epoch_needs(opt_state: Any) -> tuple[str, ...]:
  """The names (from :data:`EPOCH_INPUTS`) that the epoch hooks inside ``opt_state`` need;
  empty when none has one (then :func:`epoch_start` need not be called)."""
  names = {name for state in _hooked(opt_state) for name in type(state).EPOCH_NEEDS}
  return tuple(name for name in EPOCH_INPUTS if name in names)


def epoch_start(opt_state: Any, **inputs: Any) -> Any:
  """``opt_state`` with every state that has an epoch hook replaced by its
  ``epoch_start(**inputs)``; call it before every epoch (see the module doc). Pure and
  jit-able. Raises a ValueError naming what is missing when a hook's needs are not given,
  or what is unknown."""
  unknown = sorted(set(inputs) - set(EPOCH_INPUTS))
  if unknown:
    raise ValueError(f"epoch_start: unknown inputs {unknown}; the hooks take {EPOCH_INPUTS}.")
  missing = [name for name in epoch_needs(opt_state) if inputs.get(name) is None]
  if missing:
    raise ValueError(f"epoch_start: the optimizer state's epoch hooks need {missing} (see "
                     "gml_jax.epochs); pass them as keywords.")

  def start(node):
    if _has_hook(node):
      return node.epoch_start(**{name: inputs[name] for name in type(node).EPOCH_NEEDS})
    return node

  return jax.tree.map(start, opt_state, is_leaf=_has_hook)
