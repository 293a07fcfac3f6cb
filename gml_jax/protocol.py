"""The model protocol: what the library's steps and the utilization rate need from a model.

A model with N modalities and C classes, Linen or NNX:

* **Call.** Linen: ``model.apply(variables, inputs, *, train, cut=-1, drop=None,
  mutable=...)``, i.e. ``__call__(self, inputs, *, train, cut=-1, drop=None)``; NNX:
  ``model(inputs, *, train, cut=-1, drop=None)`` (the steps wrap it with
  :func:`gml_jax.nnx.wrap`).

  - ``inputs``: a tuple ``(x_0, ..., x_{N-1})``, one array per modality, batch axis first;
  - ``train``: bool, static: a training call (BatchNorm batch statistics, running means of
    the cuts updated) or not;
  - ``cut``: int32 scalar, traced: the branch whose cross-modal input this step cuts
    (:func:`gml_jax.rebalance_target`; -1: none). Pass it to every
    :class:`gml_jax.CrossModalCut` (or MMTM) of the model. Needed by
    :func:`gml_jax.make_train_step`;
  - ``drop``: bool[N] or None, traced: modalities whose input to the fusion is replaced by
    its training-split mean. Pass it to every cut. Needed by
    :func:`gml_jax.conditional_utilization` only.

* **Returns** ``(logits, branch_logits)``: the fused prediction ŷ, float[B, C], and every
  branch's own prediction ŷ_k stacked, float[N, B, C]. The training loss is the sum over
  branches of their cross-entropy (spec §1); ŷ is what accuracy is reported on (the mean
  of ``branch_logits`` is the paper's choice).

* **Collections.** ``params``; any model state (``batch_stats``, ``fusion_stats``: the
  cuts' running means), every leaf labelled by the same labels as the parameters (use
  :func:`gml_jax.label_rules` over module paths); ``train_means`` is written and read by
  the cuts for the utilization rate and is not model state.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, Sequence

import jax
from flax import linen


class MultiModalModel(Protocol):
  """A Linen module (or an NNX model) that follows the protocol of :mod:`gml_jax.protocol`."""

  def __call__(self, inputs: Sequence[jax.Array], *, train: bool, cut: Any = -1,
               drop: Any = None) -> tuple[jax.Array, jax.Array]:
    ...


PROTOCOL = ("model(inputs, *, train, cut=-1, drop=None) -> (logits [B, C], branch_logits "
            "[N, B, C]) with inputs a tuple of N arrays (see gml_jax.protocol)")


def as_functional(model: Any) -> Any:
  """``model`` with ``init`` and ``apply``: a Linen module as it is, an NNX model wrapped."""
  if isinstance(model, linen.Module):
    return model
  from flax import nnx  # about a second to import: not for Linen modules

  if isinstance(model, nnx.Module):
    from gml_jax.nnx import wrap
    return wrap(model)
  if not (hasattr(model, "init") and hasattr(model, "apply")):
    raise TypeError(f"Expected a Linen module or an NNX model following the protocol "
                    f"{PROTOCOL}; got {type(model).__name__}.")
  return model


def check_model(model: Any, needs: Sequence[str], user: str) -> None:
  """Raises a TypeError naming what is missing when ``model``'s call does not take the
  keyword arguments ``needs`` (``user``: the function that needs them)."""
  module_type = getattr(model, "module_type", type(model))
  call = getattr(module_type, "__call__", None)  # noqa: B004 (its signature, not a test)
  if call is None:
    return
  try:
    signature = inspect.signature(call)
  except (TypeError, ValueError):
    return
  parameters = signature.parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    return
  problems = [f"does not take {', '.join(n for n in needs if n not in parameters)}"] if any(
      n not in parameters for n in needs) else []
  positional = [p.name for p in list(parameters.values())[1:]
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                and p.name not in needs]
  if len(positional) > 1:
    problems.append(f"takes {len(positional)} positional inputs ({', '.join(positional)}) "
                    "where the steps pass one tuple")
  if problems:
    raise TypeError(
        f"{user} calls the model as {PROTOCOL}; {module_type.__name__}.__call__{signature} "
        f"{' and '.join(problems)}.")


def check_outputs(outputs: Any, batch_size: int, user: str) -> tuple[jax.Array, jax.Array]:
  """``outputs`` as (logits [B, C], branch_logits [N, B, C]), or a ValueError saying what
  was expected."""
  if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2):
    length = f" of length {len(outputs)}" if isinstance(outputs, (tuple, list)) else ""
    raise ValueError(f"{user}: the model must return (logits [B, C], branch_logits [N, B, C]);"
                     f" got {type(outputs).__name__}{length}.")
  logits, branch_logits = outputs
  shape, branch_shape = getattr(logits, "shape", None), getattr(branch_logits, "shape", None)
  if (shape is None or branch_shape is None or len(shape) != 2 or len(branch_shape) != 3
      or shape[0] != batch_size or branch_shape[1:] != shape):
    raise ValueError(
        f"{user}: the model must return (logits [B, C], branch_logits [N, B, C]) with B = "
        f"{batch_size}; got shapes {shape} and {branch_shape} (stack the branches' logits "
        "with jnp.stack on a new first axis).")
  return logits, branch_logits
