"""Writes dummy_data/: a few objects of three classes in the layout of the real renders.

Each view is a 24x24 gray PNG: a class-specific square whose brightness encodes the view
index (20 + 15 v), so tests can tell which views a config read.

  python data_prep/modelnet40_views/make_dummy_data.py
"""

import pathlib

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent / "dummy_data" / "modelnet40_images_new_12x"
OBJECTS = {"airplane": (5, 2), "bed": (5, 2), "chair": (5, 2)}  # (train, test) objects


def view_image(class_index: int, view: int) -> Image.Image:
  pixels = np.zeros((24, 24), np.uint8)
  top = 2 + 6 * class_index
  pixels[top: top + 6, 4:20] = 20 + 15 * view
  return Image.fromarray(pixels, mode="L")


def main():
  for c, (cls, counts) in enumerate(OBJECTS.items()):
    number = 0
    for split, count in zip(("train", "test"), counts):
      folder = ROOT / cls / split
      folder.mkdir(parents=True, exist_ok=True)
      for _ in range(count):
        number += 1
        for view in range(12):
          view_image(c, view).save(folder / f"{cls}_{number:04d}.obj.shaded_v{view + 1:03d}.png")


if __name__ == "__main__":
  main()
