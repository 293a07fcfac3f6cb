"""Input-pipeline benchmark: samples/s of the runner's train and eval pipelines at the real
shapes, by number of reading threads, so that a reader can tell how many CPU cores feed one
accelerator (``make bench``; needs the ``experiments`` extra, unlike the step benchmark).

Each workload is a synthetic source in the form its builder stores (tensors, or PNG bytes
decoded on every read as tfds does) with the experiment's preprocessing: Colored MNIST,
ModelNet40's two 224² views (as PNGs, and as decoded 224² tensors: the builder config
``views_0_6_224px``) with flips and ImageNet normalisation, NVGesture's 32×112² RGB and depth
clips. Host batches only (no device placement): what the CPU side can deliver.
"""

from __future__ import annotations

import io
import time

import numpy as np

from gml_jax.runner.pipeline import Preprocess, host_eval_batches, host_train_batches


class SyntheticSource:
  """``size`` random examples with the given features; ``png`` features are stored as PNG
  bytes and decoded (with PIL, like tfds's image feature) on every read."""

  def __init__(self, size: int, shapes: dict, png: tuple = ()):
    self.size, self.shapes, self.png = size, shapes, png
    rng = np.random.default_rng(0)
    self.pool = {k: [self._store(k, rng.integers(0, 256, shape, np.uint8)) for _ in range(8)]
                 for k, shape in shapes.items()}

  def _store(self, key, array):
    if key not in self.png:
      return array
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    example = {"label": index % 10}
    for key in self.shapes:
      stored = self.pool[key][index % 8]
      if key in self.png:
        from PIL import Image

        stored = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))
      example[key] = stored
    return example


# name: (source, preprocessing, batch size, the step workload it feeds)
def workloads() -> dict:
  views = {"view_0": (224, 224, 3), "view_1": (224, 224, 3)}
  imagenet = dict(image_size=224, normalize="imagenet", hflip=True)
  return {
      "colored_mnist": (SyntheticSource(4096, {"gray": (28, 28, 1), "colored": (28, 28, 3)}),
                        Preprocess(("gray", "colored")), 64, "cnn_b64"),
      "modelnet40_png": (SyntheticSource(512, views, png=("view_0", "view_1")),
                         Preprocess(("view_0", "view_1"), **imagenet), 8, "resnet18_b8"),
      "modelnet40_224px": (SyntheticSource(512, views),
                           Preprocess(("view_0", "view_1"), **imagenet), 8, "resnet18_b8"),
      "nvgesture": (SyntheticSource(128, {"rgb": (32, 112, 112, 3), "depth": (32, 112, 112, 1)}),
                    Preprocess(("rgb", "depth")), 8, "i3d_b8"),
  }


def _rate(batches, batch_size: int, count: int) -> float:
  next(batches)  # start-up (threads, first reads) outside the timing
  start = time.perf_counter()
  for _ in range(count):
    next(batches)
  return count * batch_size / (time.perf_counter() - start)


def bench_pipeline(name: str, threads: list[int], batches: int) -> list[dict]:
  source, prep, batch_size, feeds = workloads()[name]
  rows = []
  for n in threads:
    count = min(batches, len(source) // batch_size - 1)
    train = host_train_batches(source, prep, batch_size, seed=0, epoch=0, num_threads=n)
    evaluation = host_eval_batches(source, prep, batch_size, num_threads=n)
    rows.append({"pipeline": name, "threads": n, "batch": batch_size, "feeds": feeds,
                 "train_samples_per_s": _rate(train, batch_size, count),
                 "eval_samples_per_s": _rate(evaluation, batch_size, count)})
  return rows


def format_table(rows: list[dict], step_rates: dict) -> str:
  """Pipeline rates, and beside them the step rate of the workload each one feeds."""
  lines = [f"{'pipeline':18} {'threads':>7} {'train/s':>9} {'eval/s':>9} {'step/s':>9} "
           f"{'threads to feed':>15}"]
  for r in rows:
    step = step_rates.get(r["feeds"])
    per_thread = r["train_samples_per_s"] / r["threads"]
    need = f"{step / per_thread:15.1f}" if step else f"{'-':>15}"
    lines.append(f"{r['pipeline']:18} {r['threads']:7d} {r['train_samples_per_s']:9.0f} "
                 f"{r['eval_samples_per_s']:9.0f} {step or 0:9.0f} {need}")
  return "\n".join(lines)
