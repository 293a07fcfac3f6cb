"""A small synthetic two-modality task with an easy spurious cue, generated in memory.

It copies the structure of Colored MNIST (spec §5) without any download: each class has a
fixed random shape ("glyph"); an example is its class's glyph, randomly shifted, plus
pixel noise.

* m_0: the gray glyph, float[16, 16, 1];
* m_1: the same glyph with its strokes colored, float[16, 16, 3]. In ``train`` and
  ``test_biased`` the color is the class's color plus Gaussian jitter of variance
  ``color_var``; in ``test`` the color of a random class, independent of the label.

The color is the easy cue: a greedy model leans on m_1's color and under-uses the shape.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

SIZE = 16
NUM_CLASSES = 10


def _glyphs(rng: np.random.Generator) -> np.ndarray:
  """One smooth random 10x10 blob per class, float[classes, 10, 10] in [0, 1]."""
  noise = rng.uniform(size=(NUM_CLASSES, 5, 5))
  glyphs = np.kron(noise, np.ones((2, 2)))  # 10x10, blocky
  return (glyphs > 0.5).astype(np.float32)


def _colors(rng: np.random.Generator | None = None) -> np.ndarray:
  """Ten well separated class colors, float[classes, 3]."""
  hues = np.arange(NUM_CLASSES) / NUM_CLASSES
  base = np.stack([np.cos(2 * np.pi * (hues + s)) for s in (0, 1 / 3, 2 / 3)], -1)
  return (0.5 + 0.5 * base).astype(np.float32)


def make_split(
    size: int, *, biased: bool, color_var: float = 0.02, noise: float = 0.3, seed: int = 0
) -> dict:
  """``size`` examples as a batch dict ``{"inputs": (gray, colored), "label"}``.

  ``biased``: stroke color follows the label (train, test_biased) or not (test).
  The glyphs and colors depend only on a fixed seed, so every split shares them.
  """
  shared = np.random.default_rng(1234)
  glyphs, colors = _glyphs(shared), _colors(shared)
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, size)
  gray = np.zeros((size, SIZE, SIZE), np.float32)
  shifts = rng.integers(0, SIZE - 10 + 1, (size, 2))
  for i, (label, (dy, dx)) in enumerate(zip(labels, shifts)):
    gray[i, dy : dy + 10, dx : dx + 10] = glyphs[label]
  gray = np.clip(gray + rng.normal(scale=noise, size=gray.shape), 0, 1).astype(np.float32)
  color_class = labels if biased else rng.integers(0, NUM_CLASSES, size)
  color = colors[color_class] + rng.normal(scale=np.sqrt(color_var), size=(size, 3))
  colored = gray[..., None] * np.clip(color, 0, 1)[:, None, None, :].astype(np.float32)
  return {"inputs": (gray[..., None], colored.astype(np.float32)), "label": labels.astype(np.int32)}


def make_dataset(train_size: int = 4096, test_size: int = 1024, color_var: float = 0.02,
                 seed: int = 0) -> dict:
  """Splits ``train``, ``test`` (color independent of the label) and ``test_biased``."""
  return {
      "train": make_split(train_size, biased=True, color_var=color_var, seed=seed),
      "test": make_split(test_size, biased=False, color_var=color_var, seed=seed + 1),
      "test_biased": make_split(test_size, biased=True, color_var=color_var, seed=seed + 2),
  }


def batches(split: dict, batch_size: int, *, seed: int | None = None) -> Iterator[dict]:
  """Batches of a split held in memory.

  With ``seed``: one shuffled epoch of full batches (the remainder is dropped), for
  training. Without: every example once, in order; the last batch is padded to
  ``batch_size`` and carries ``mask`` (0 on padding), for evaluation.
  """
  n = len(split["label"])
  take = lambda idx: {
      "inputs": tuple(x[idx] for x in split["inputs"]), "label": split["label"][idx]}
  if seed is not None:
    order = np.random.default_rng(seed).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      yield take(order[start : start + batch_size])
    return
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    batch = take(np.minimum(idx, n - 1))
    yield batch | {"mask": (idx < n).astype(np.float32)}
