"""Flax NNX: the cut for any fusion, and NNX models in the library's steps.

* :class:`CrossModalCut`: the NNX twin of :class:`gml_jax.CrossModalCut` (same behaviour,
  same variable names: ``running_mean``, ``running_count``, ``train_mean``).
* :func:`wrap`: an NNX model as a functional model with ``init`` and ``apply`` in Linen's
  form, so that :func:`gml_jax.create_train_state`, :func:`gml_jax.make_train_step`,
  :func:`gml_jax.make_eval_step` and :func:`gml_jax.conditional_utilization` take it (they
  wrap an ``nnx.Module`` themselves). Variables become collections by type: ``nnx.Param``
  -> ``params``, ``nnx.BatchStat`` -> ``batch_stats``, :class:`FusionStat` ->
  ``fusion_stats``, :class:`TrainMean` -> ``train_means``, anything else -> ``nnx_other``;
  what the model sows as ``nnx.Intermediate`` comes back in ``intermediates`` when asked
  (``mutable=["intermediates"]``), as from Linen: PMR's features
  (``self.sow(nnx.Intermediate, "features", h_k)`` once per branch).

* :func:`stats` and :func:`keep_frozen`: a hand-written NNX train step that keeps the
  model state of frozen branches (BatchNorm statistics, the cuts' running means) in
  re-balancing steps. ``nnx.state(model)`` holds live variables, which the forward pass
  updates: the values before it must be copied first. The recipe::

    @nnx.jit
    def step(model, optimizer, batch):
      mode = gml_jax.step_mode(optimizer.opt_state)       # before the update
      before = gml_jax.nnx.stats(model)                   # a copy, before the forward pass

      def loss_fn(model):
        logits, branch_logits = model(batch["inputs"], train=True, cut=mode.target)
        ...
      optimizer.update(model, nnx.grad(loss_fn)(model))
      gml_jax.nnx.keep_frozen(mode, labels, model, before)  # frozen branches' state back

  (``docs/tutorials/n_modalities.md`` has it whole and tested.)

An NNX model in these steps is called as ``model(inputs, *, train, cut, drop)`` (see
:mod:`gml_jax.protocol`); ``train`` selects batch statistics (pass
``use_running_average=not train`` to ``nnx.BatchNorm``).
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gml_jax import balancing
from gml_jax.fusion import FUSION_STATS, TRAIN_MEANS, check_switches, substitute


class FusionStat(nnx.Variable):
  """Running means of a :class:`CrossModalCut` (model state, collection ``fusion_stats``)."""


class TrainMean(nnx.Variable):
  """Training-split means of a :class:`CrossModalCut` (collection ``train_means``)."""


INTERMEDIATES = "intermediates"
"""The collection in which :meth:`NNXModel.apply` returns what the model sowed as
``nnx.Intermediate`` (``self.sow(nnx.Intermediate, "features", h_k)``: PMR's features)."""

COLLECTIONS = (("params", nnx.Param), ("batch_stats", nnx.BatchStat),
               (FUSION_STATS, FusionStat), (TRAIN_MEANS, TrainMean), ("nnx_other", ...))
"""(collection, NNX variable type) pairs of :func:`wrap`, in order; ``...``: the rest."""


class CrossModalCut(nnx.Module):
  """The cut for any fusion, in NNX: put it on the cross-modal signal entering ``branch``.

  Behaves as :class:`gml_jax.CrossModalCut` (read its documentation): ``cut == branch``
  substitutes the running mean of earlier training calls (and leaves it in place),
  ``drop`` of a source substitutes the training-split mean, a normal training call updates
  the running mean.

  Args:
    shape: the signal's shape without the batch axis (e.g. ``(2 * width,)``).
    branch: the branch the signal enters; None: never cut.
    sources: modalities the signal is computed from; None: every modality but ``branch``;
      ``()``: never dropped.
  """

  def __init__(self, shape: Sequence[int], *, branch: int | None = None,
               sources: Sequence[int] | None = None):
    shape = tuple(int(d) for d in shape)
    self.shape, self.branch = shape, branch
    self.sources = None if sources is None else tuple(sources)
    self.capture_signals = False  # set by wrap()'s apply while training_means collects
    if branch is not None:
      self.running_mean = FusionStat(jnp.zeros(shape, jnp.float32))
      self.running_count = FusionStat(jnp.zeros((), jnp.float32))
    if self.sources != ():
      self.train_mean = TrainMean(jnp.zeros(shape, jnp.float32))

  def __call__(self, signal: jax.Array, *, train: bool, cut: jax.Array | int = -1,
               drop: jax.Array | None = None) -> jax.Array:
    if jnp.shape(signal)[1:] != self.shape:
      raise ValueError(f"gml_jax.nnx.CrossModalCut(shape={self.shape}): got a signal of shape "
                       f"{jnp.shape(signal)}; expected [B, {', '.join(map(str, self.shape))}].")
    check_switches("gml_jax.nnx.CrossModalCut", cut, drop)
    used = signal
    if self.sources != ():
      if self.capture_signals:
        self.train_mean.set_value(signal)  # collected by training_means
      sources = self.sources
      if drop is not None and sources is None:
        sources = [j for j in range(jnp.shape(drop)[0]) if j != self.branch]
      if drop is not None and sources:
        dropped = jnp.any(jnp.asarray(drop)[jnp.asarray(sources)])
        used = substitute(used, self.train_mean.get_value(), dropped)
    if self.branch is not None:
      is_cut = jnp.asarray(cut) == self.branch
      mean, count = self.running_mean.get_value(), self.running_count.get_value()
      used = substitute(used, mean, is_cut)
      if train:
        new_count = count + 1.0
        new_mean = mean + (jnp.mean(signal, axis=0) - mean) / new_count
        self.running_mean.set_value(jnp.where(is_cut, mean, new_mean))
        self.running_count.set_value(jnp.where(is_cut, count, new_count))
    return used


class NNXModel:
  """An NNX model seen as a functional model: ``init`` and ``apply`` in Linen's form.

  Made by :func:`wrap`. ``apply(variables, inputs, *, train, cut=-1, drop=None,
  mutable=False)`` merges the variables into the model's graph, calls it, and (with
  ``mutable``, a list of collection names) returns ``(outputs, updated collections)``;
  ``"intermediates"`` among them: what the call sowed as ``nnx.Intermediate``.
  """

  def __init__(self, module: nnx.Module):
    self.module_type = type(module)
    try:
      parameters = inspect.signature(type(module).__call__).parameters
      self._takes_cut = "cut" in parameters or any(
          p.kind is p.VAR_KEYWORD for p in parameters.values())
    except (TypeError, ValueError):
      self._takes_cut = True
    self.graphdef, *states = nnx.split(module, *(t for _, t in COLLECTIONS))
    self._templates = dict(zip((name for name, _ in COLLECTIONS), states))

  def init(self, rng=None, inputs=None, **_) -> dict:
    """The wrapped model's variables, by collection (the model is already initialised:
    ``rng`` and ``inputs`` are ignored; ``train_means`` is left out, as Linen does)."""
    del rng, inputs
    return {name: nnx.to_pure_dict(state) for name, state in self._templates.items()
            if name != TRAIN_MEANS and jax.tree.leaves(state)}

  def _states(self, variables: dict) -> list:
    if not isinstance(variables, Mapping):  # None would fail obscurely below
      raise TypeError(f"The variables of {self.module_type.__name__} must be a dict of "
                      f"collections {sorted(self.init())} of arrays (gml_jax.nnx.wrap(model)"
                      f".init(), or a TrainState's .variables); got {type(variables).__name__}.")
    states = []
    for name, template in self._templates.items():
      state = jax.tree.map(lambda x: x, template)  # a copy: the template stays untouched
      if name in variables:
        nnx.replace_by_pure_dict(state, variables[name])
      elif name != TRAIN_MEANS and jax.tree.leaves(state):
        raise ValueError(f"The variables of {self.module_type.__name__} lack the collection "
                         f"{name!r}; expected {sorted(self.init())}.")
      states.append(state)
    return states

  def module(self, variables: dict) -> nnx.Module:
    """The NNX model holding ``variables`` (e.g. a trained ``TrainState.variables``)."""
    return nnx.merge(self.graphdef, *self._states(variables))

  def apply(self, variables: dict, inputs, *, train: bool, cut: Any = -1, drop: Any = None,
            mutable: Any = False):
    module = self.module(variables)
    if mutable is not False and TRAIN_MEANS in mutable:
      for _, m in nnx.iter_modules(module):
        if isinstance(m, CrossModalCut):
          m.capture_signals = True
    kwargs = {"train": train} | ({} if drop is None else {"drop": drop})
    if self._takes_cut:
      kwargs["cut"] = cut
    elif not (isinstance(cut, int) and cut == -1):  # only a step that re-balances cuts
      raise TypeError(f"{self.module_type.__name__}.__call__ takes no `cut`, which a train step "
                      "that re-balances passes; add `cut=-1` to its keyword arguments and pass "
                      "it to every gml_jax.nnx.CrossModalCut.")
    sown = mutable is not False and INTERMEDIATES in mutable
    out, intermediates = _call(module, tuple(inputs), kwargs, sown)
    if mutable is False:
      return out
    _, *states = nnx.split(module, *(t for _, t in COLLECTIONS))
    collections = {name: nnx.to_pure_dict(state)
                   for (name, _), state in zip(COLLECTIONS, states) if name in mutable}
    return out, collections | ({INTERMEDIATES: intermediates} if sown else {})


def _call(module: nnx.Module, inputs: tuple, kwargs: dict, sown: bool) -> tuple[Any, dict]:
  """The module's outputs and, with ``sown``, what it sowed as ``nnx.Intermediate`` (a
  pure dict, ``{"features": (h_0, ..., h_(N-1))}`` for PMR), in Linen's ``intermediates``
  form: sowing is captured (``nnx.capture``), not left on the module."""
  if not sown:
    return module(inputs, **kwargs), {}
  out, intermediates = nnx.capture(module, nnx.Intermediate)(inputs, **kwargs)
  return out, nnx.to_pure_dict(intermediates)


def wrap(module: nnx.Module) -> NNXModel:
  """``module`` as a functional model for the library's steps (see :class:`NNXModel`).

  The steps wrap an ``nnx.Module`` themselves; wrap it yourself to get the trained model
  back: ``wrap(model).module(state.variables)``.
  """
  if not isinstance(module, nnx.Module):
    raise TypeError(f"gml_jax.nnx.wrap takes an nnx.Module; got {type(module).__name__}.")
  return NNXModel(module)


# --------------------------------------------------------------------------------------
# A hand-written NNX step

STATS = nnx.Any(nnx.BatchStat, FusionStat)
"""The model state that a training forward pass updates and a re-balancing step keeps
frozen for the other branches: BatchNorm statistics and the cuts' running means."""


def stats(model: nnx.Module, which: Any = STATS) -> dict:
  """A copy of ``model``'s state of the kinds ``which`` (default :data:`STATS`) as a pure
  dict of arrays: read it *before* the forward pass, for :func:`keep_frozen`.

  (``nnx.state(model)`` would hold the live variables, which the forward pass updates.)
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"gml_jax.nnx.stats takes the nnx.Module; got {type(model).__name__}.")
  return nnx.to_pure_dict(nnx.state(model, which))


def keep_frozen(mode: balancing.StepMode, labels: Any, model: nnx.Module, before: dict,
                which: Any = STATS) -> None:
  """Puts the state of ``model`` that the step of ``mode`` freezes back to ``before``, in
  place: BatchNorm statistics and the cuts' running means of the branches that a
  re-balancing step does not train (see :func:`gml_jax.keep_frozen`).

  Args:
    mode: :func:`gml_jax.step_mode` of the optimizer state, read before the update.
    labels: the label rules of the model's parameters (they label every collection).
    model: the model after the forward pass (and the optimizer's update).
    before: :func:`stats` of the model, read before the forward pass.
    which: the kinds of state, as given to :func:`stats`.
  """
  if not isinstance(before, dict):
    raise TypeError("gml_jax.nnx.keep_frozen: `before` must be gml_jax.nnx.stats(model) read "
                    f"before the forward pass (a dict of arrays); got {type(before).__name__}.")
  state = nnx.state(model, which)
  kept = balancing.keep_frozen(mode, labels, nnx.to_pure_dict(state), before)
  nnx.replace_by_pure_dict(state, kept)
  nnx.update(model, state)
