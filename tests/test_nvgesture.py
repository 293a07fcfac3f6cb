"""NVGesture: the builder on generated videos laid out like the real tree, the I3D pair
against the known architecture, converted weights, and a few steps through the CLI."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from run_helpers import NVGESTURE_DUMMY as DUMMY
from run_helpers import build_dataset

from data_prep.nvgesture import Builder, check_manual_dir
from data_prep.nvgesture import nvgesture_dataset_builder as nvg
from gml_jax import models

# Every test here compiles the same i3d pair: on one xdist worker (make test's
# --dist loadgroup), the tests after the first find it in the worker's compilation cache.
pytestmark = pytest.mark.xdist_group("i3d")


def build(data_dir, manual_dir=DUMMY):
  return build_dataset(Builder, "frames8_32px", data_dir, manual_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return build(tmp_path_factory.mktemp("tfds"))


def test_splits_shapes_labels_and_sampled_frames(built):
  splits = {k: v.num_examples for k, v in built.info.splits.items()}
  assert splits == {"train": 11, "validation": 1, "test": 3}  # 12 train recordings, 10% held out
  test = built.as_data_source()["test"]
  labels = []
  for i in range(len(test)):
    e = test[i]
    assert e["rgb"].shape == (8, 32, 32, 3) and e["depth"].shape == (8, 32, 32, 1)
    assert e["rgb"].dtype == e["depth"].dtype == np.uint8
    labels.append(e["label"])
    # Annotated frames [2, 10), 8 samples: frames 2..9; frame i has brightness 20 i, and
    # the color clip's red channel a tint of 10 (label + 1).
    np.testing.assert_allclose(e["depth"].mean(axis=(1, 2, 3)), 20 * np.arange(2, 10), atol=4)
    np.testing.assert_allclose(e["rgb"][..., 0].mean(axis=(1, 2)),
                               20 * np.arange(2, 10) + 10 * (e["label"] + 1), atol=4)
  assert sorted(labels) == [0, 1, 2]


def test_list_parsing_and_bad_input(tmp_path):
  entries = nvg.parse_list(DUMMY / nvg.LISTS["train"])
  assert entries[0] == nvg.Entry("./Video_data/class_01/subject0_r0", ("sk_color", 2, 10),
                                 ("sk_depth", 2, 10), 0)
  with pytest.raises(FileNotFoundError, match="nvgesture_train_correct_cvpr2016_v2.lst"):
    check_manual_dir(tmp_path)
  broken = tmp_path / "broken"
  shutil.copytree(DUMMY, broken)
  lst = broken / nvg.LISTS["test"]
  lst.write_text(lst.read_text() + "path:./Video_data/x depth:sk_depth:2 label:3\n")
  with pytest.raises(ValueError, match=r"cvpr2016_v2.lst:4: malformed line"):
    nvg.parse_list(lst)
  lst.write_text("path:./Video_data/class_09/none depth:sk_depth:2:10 color:sk_color:2:10 "
                 "label:9\n")
  with pytest.raises(FileNotFoundError, match=r"Missing video .*class_09/none/sk_color.avi"):
    build(tmp_path / "tfds", manual_dir=broken)
  with pytest.raises(ValueError, match=r"cannot take frames \[2, 40\)"):
    nvg.read_clip(DUMMY / "Video_data/class_01/subject0_r0/sk_color.avi", 2, 40, 4, 8)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_i3d_pair_matches_the_architecture():
  model = models.i3d_fusion(num_classes=25)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), [jnp.zeros((1, 8, 32, 32, 3)), jnp.zeros((1, 8, 32, 32, 1))],
      train=False))["params"]
  unit = lambda cin, cout, k=1: k ** 3 * cin * cout + 2 * cout  # conv (no bias) + BN
  def inception(cin, a, br, b, cr, c, pool):
    return (unit(cin, a) + unit(cin, br) + unit(br, b, 3) + unit(cin, cr) + unit(cr, c, 3)
            + unit(cin, pool), a + b + c + pool)
  total, channels = unit(3, 64, 7) + unit(64, 64) + unit(64, 192, 3), 192
  for name in ("3b", "3c", "4b", "4c", "4d", "4e", "4f", "5b", "5c"):
    count, channels = inception(channels, *models.backbone("i3d").I3D_BLOCKS[name])
    total += count
  assert channels == 1024
  assert _count(params["branches_0"]) == total + 1024 * 25 + 25
  # Depth has 1 channel: its first kernel has 7^3 * 2 * 64 weights fewer.
  assert _count(params["branches_1"]) == total - 7 ** 3 * 2 * 64 + 1024 * 25 + 25
  # MMTM after Mixed_4f (832 channels), Mixed_5b (832), Mixed_5c (1024).
  for i, c in enumerate((832, 832, 1024)):
    assert params[f"fusion_{i}"]["squeeze"]["kernel"].shape == (2 * c, c)


def _random_values(layout, seed):
  """A tree of standard normal arrays from ``seed``, with the shapes of ``layout``."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), layout)


def test_converted_weights_load_into_a_branch(tmp_path):
  # The full-width I3D pair's variables, filled with random values: the loader reads names
  # and shapes, which tracing gives (initialising the pair compiles for over 20 s).
  model = models.i3d_fusion(num_classes=25)
  inputs = [jnp.zeros((1, 8, 32, 32, 3)), jnp.zeros((1, 8, 32, 32, 1))]
  layout = jax.eval_shape(lambda key: model.init(key, inputs, train=False), jax.random.key(0))
  variables = _random_values(layout, seed=0)
  # A "converted" RGB checkpoint: other values, with a 400-way head to ignore.
  other = _random_values(layout, seed=1)
  flat = {}
  for col in ("params", "batch_stats"):
    for key, value in traverse_util.flatten_dict(other[col]["branches_0"], sep="/").items():
      flat[f"{col}/{key}"] = np.asarray(value) + (0.5 if col == "batch_stats" else 0.0)
  flat["params/head/kernel"] = np.zeros((1024, 400), np.float32)
  path = tmp_path / "i3d_rgb.npz"
  np.savez(path, **flat)

  loaded = models.load_branch_weights(variables, 0, path)
  rgb = loaded["params"]["branches_0"]
  np.testing.assert_array_equal(rgb["stages_3"]["InceptionBlock_0"]["Unit3D_0"]["Conv_0"]["kernel"],
                                flat["params/stages_3/InceptionBlock_0/Unit3D_0/Conv_0/kernel"])
  np.testing.assert_array_equal(loaded["batch_stats"]["branches_0"]["stages_0"]["Unit3D_0"]["BatchNorm_0"]["mean"],
                                flat["batch_stats/stages_0/Unit3D_0/BatchNorm_0/mean"])
  # The head and the other branch keep their own values.
  np.testing.assert_array_equal(rgb["head"]["kernel"],
                                variables["params"]["branches_0"]["head"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["branches_1"],
               variables["params"]["branches_1"])

  # RGB weights into the depth branch: the first kernel averaged over its 3 input channels.
  depth = models.load_branch_weights(variables, 1, path)["params"]["branches_1"]
  first = flat["params/stages_0/Unit3D_0/Conv_0/kernel"]
  np.testing.assert_allclose(depth["stages_0"]["Unit3D_0"]["Conv_0"]["kernel"],
                             first.mean(axis=-2, keepdims=True), rtol=1e-6)

  del flat["params/stages_5/InceptionBlock_0/Unit3D_0/Conv_0/kernel"]
  np.savez(tmp_path / "partial.npz", **flat)
  with pytest.raises(ValueError, match="lacks 1 weights of branch 0"):
    models.load_branch_weights(variables, 0, tmp_path / "partial.npz")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    models.load_branch_weights(variables, 0, tmp_path / "nothing.npz")


def test_cli_trains_nvgesture(nvgesture_study):
  study_dir, result = nvgesture_study  # the CLI run of tests/conftest.py
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((study_dir / "guided" / "seed_0" / "summary.json").read_text())
  assert summary["test_examples"] == 3 and summary["steps"] == 4
  # 3 test clips after 4 steps: a branch may score 0, which leaves its rate undefined.
  assert summary["d_util"] is None or np.isfinite(summary["d_util"])
  assert 0 <= summary["test_accuracy"] <= 1
