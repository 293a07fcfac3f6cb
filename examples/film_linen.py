"""A Linen model of your own, FiLM fusion (not MMTM), balanced with gml_jax.

Each branch's features are scaled and shifted by a FiLM generator fed by the other
branch; a ``gml_jax.CrossModalCut`` sits on each FiLM signal, so that a re-balancing step
for branch k replaces it by its running mean (and the utilization rate by its training
mean). Labels come from rules over module names. Run: ``python examples/film_linen.py``.
"""

import flax.linen as nn
import jax.numpy as jnp
from spurious_task import CLASSES, main

import gml_jax

WIDTH = 32

LABELS = gml_jax.label_rules([
    (r"(?:encoder|hidden|head)_(\d)", r"main:\1"),  # branch k and its head
    (r"(?:film|cut)_(\d)", r"fusion:\1"),           # the FiLM into branch k, and its cut
])


class FiLMNet(nn.Module):
  """Two branches; the model protocol: (inputs, *, train, cut, drop) -> (ŷ, ŷ_k stacked)."""

  @nn.compact
  def __call__(self, inputs, *, train, cut=-1, drop=None):
    h = [nn.relu(nn.Dense(WIDTH, name=f"encoder_{k}")(x)) for k, x in enumerate(inputs)]
    logits = []
    for k in range(2):
      film = nn.Dense(2 * WIDTH, name=f"film_{k}")(h[1 - k])  # from the other modality
      film = gml_jax.CrossModalCut(branch=k, name=f"cut_{k}")(film, train=train, cut=cut,
                                                               drop=drop)
      fused = h[k] * (1 + film[:, :WIDTH]) + film[:, WIDTH:]
      hidden = nn.relu(nn.Dense(WIDTH, name=f"hidden_{k}")(fused))
      logits.append(nn.Dense(CLASSES, name=f"head_{k}")(hidden))
    branch_logits = jnp.stack(logits)  # [N, B, C]
    return branch_logits.mean(axis=0), branch_logits


if __name__ == "__main__":
  main(lambda seed: FiLMNet(), LABELS, __doc__.splitlines()[0])  # seeded at init
