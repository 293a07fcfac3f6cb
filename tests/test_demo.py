"""The synthetic task and the demo end to end, on tiny sizes."""

import json
import math

import numpy as np
import pytest

from gml_jax import demo, synthetic


def _stroke_colors(split):
  """Each example's stroke color: colored / gray on the stroke pixels (float[n, 3])."""
  gray, colored = split["inputs"]
  on = np.broadcast_to(gray > 0.1, colored.shape)
  ratio = np.where(on, colored / np.maximum(gray, 1e-6), np.nan)
  return ratio.reshape(len(ratio), -1, 3)


def test_color_is_a_cue_only_in_biased_splits():
  data = synthetic.make_dataset(train_size=1000, test_size=1000, seed=3)
  colors = synthetic._colors()
  agreement = {}
  for name, split in data.items():
    per_pixel = _stroke_colors(split)
    # The colored image is the gray glyph times one color: the ratio is constant.
    assert np.nanmax(np.nanstd(per_pixel, axis=1)) < 1e-4
    stroke = np.nanmean(per_pixel, axis=1)
    nearest = np.linalg.norm(stroke[:, None] - colors[None], axis=-1).argmin(-1)
    agreement[name] = np.mean(nearest == split["label"])
  # Jitter of variance 0.02 blurs neighbouring hues a little; chance is 0.1.
  assert agreement["train"] > 0.75 and agreement["test_biased"] > 0.75
  assert agreement["test"] < 0.15
  for split in data.values():
    gray, colored = split["inputs"]
    assert gray.shape[1:] == (16, 16, 1) and colored.shape[1:] == (16, 16, 3)


def test_eval_batches_cover_every_example_once():
  split = synthetic.make_split(70, biased=True)
  seen = np.concatenate([b["label"][b["mask"] > 0] for b in synthetic.batches(split, 32)])
  np.testing.assert_array_equal(seen, split["label"])
  train = list(synthetic.batches(split, 32, seed=0))
  assert len(train) == 2 and all(len(b["label"]) == 32 for b in train)


def test_demo_end_to_end(tmp_path, capsys):
  out = tmp_path / "results.json"
  results = demo.main(["--epochs", "2", "--train-size", "256", "--test-size", "64",
                       "--batch-size", "32", "--width", "4", "--json", str(out)])
  assert [r["method"] for r in results] == ["vanilla", "random", "guided"]
  for r in results:
    for key in ("test_accuracy", "test_branch_0_accuracy", "test_branch_1_accuracy",
                "test_biased_accuracy"):
      assert 0.0 <= r[key] <= 1.0
    assert all(math.isfinite(r[k]) for k in ("u(m1|m0)", "u(m0|m1)", "d_util", "final_d_speed"))
    assert 0 <= r["rebalance_share_m0"] + r["rebalance_share_m1"] <= 1
    assert r["steps"] == 16 and r["samples_per_s"] > 0
  assert results[0]["rebalance_share_m0"] == results[0]["rebalance_share_m1"] == 0
  # One warm-up epoch (8 steps) of normal steps, then the random method re-balances.
  assert results[1]["rebalance_share_m0"] + results[1]["rebalance_share_m1"] > 0
  assert json.loads(out.read_text())["results"] == results
  printed = capsys.readouterr().out
  assert "u(m1|m0)" in printed and "guided" in printed


def test_demo_rejects_unknown_method():
  with pytest.raises(SystemExit):
    demo.parse_args(["--methods", "vanilla,greedy"])
