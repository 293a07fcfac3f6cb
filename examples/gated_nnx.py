"""An NNX model of your own, gated cross-connections (not MMTM), balanced with gml_jax.

Each branch adds a gated message from the other branch: ``h_k + σ(W_g h_j) ⊙ W_m h_j``; a
``gml_jax.nnx.CrossModalCut`` sits on each message, so that a re-balancing step for branch
k replaces it by its running mean (and the utilization rate by its training mean). The
library's steps take the NNX model as it is (``gml_jax.nnx.wrap`` gives the trained model
back). Run: ``python examples/gated_nnx.py``.
"""

import jax.numpy as jnp
from flax import nnx
from spurious_task import CLASSES, main

import gml_jax

WIDTH = 32

LABELS = gml_jax.label_rules([
    (r"(?:encoder|hidden|head)_(\d)", r"main:\1"),   # branch k and its head
    (r"(?:gate|message|cut)_(\d)", r"fusion:\1"),    # the connection into branch k, its cut
])


class GatedNet(nnx.Module):
  """Two branches; the model protocol: (inputs, *, train, cut, drop) -> (ŷ, ŷ_k stacked)."""

  def __init__(self, seed: int):
    rngs = nnx.Rngs(seed)
    linear = lambda d_in, d_out: nnx.Linear(d_in, d_out, rngs=rngs)
    self.encoder_0, self.encoder_1 = linear(16, WIDTH), linear(8, WIDTH)
    self.gate_0, self.gate_1 = linear(WIDTH, WIDTH), linear(WIDTH, WIDTH)
    self.message_0, self.message_1 = linear(WIDTH, WIDTH), linear(WIDTH, WIDTH)
    self.cut_0 = gml_jax.nnx.CrossModalCut((WIDTH,), branch=0)
    self.cut_1 = gml_jax.nnx.CrossModalCut((WIDTH,), branch=1)
    self.hidden_0, self.hidden_1 = linear(WIDTH, WIDTH), linear(WIDTH, WIDTH)
    self.head_0, self.head_1 = linear(WIDTH, CLASSES), linear(WIDTH, CLASSES)

  def __call__(self, inputs, *, train, cut=-1, drop=None):
    h = [nnx.relu(self.encoder_0(inputs[0])), nnx.relu(self.encoder_1(inputs[1]))]
    into = [(self.gate_0, self.message_0, self.cut_0, self.hidden_0, self.head_0),
            (self.gate_1, self.message_1, self.cut_1, self.hidden_1, self.head_1)]
    logits = []
    for k, (gate, message, cut_k, hidden, head) in enumerate(into):
      other = h[1 - k]
      signal = cut_k(nnx.sigmoid(gate(other)) * message(other), train=train, cut=cut, drop=drop)
      logits.append(head(nnx.relu(hidden(h[k] + signal))))
    branch_logits = jnp.stack(logits)  # [N, B, C]
    return branch_logits.mean(axis=0), branch_logits


if __name__ == "__main__":
  main(GatedNet, LABELS, __doc__.splitlines()[0])
