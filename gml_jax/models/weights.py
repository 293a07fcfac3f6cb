"""Converted weights (e.g. Kinetics-pretrained I3D) for one branch of a fusion network."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import traverse_util


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
