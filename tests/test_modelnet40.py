"""The ModelNet40 two-view builder on dummy data laid out like the real renders, and the
experiment through the CLI on tiny images."""

import json
import shutil
import tarfile

import numpy as np
import pytest
from run_helpers import MODELNET40_DUMMY as DUMMY
from run_helpers import build_dataset, epoch_rows

from data_prep.modelnet40_views import Builder, check_manual_dir
from data_prep.modelnet40_views import modelnet40_views_dataset_builder as mn
from gml_jax.runner.pipeline import Preprocess

# Every test here compiles the same resnet18 pair: on one xdist worker (make test's
# --dist loadgroup), the tests after the first find it in the worker's compilation cache.
pytestmark = pytest.mark.xdist_group("resnet18")


def build(data_dir, manual_dir=DUMMY, config="views_0_6"):
  return build_dataset(Builder, config, data_dir, manual_dir)


def _all(source):
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return build(tmp_path_factory.mktemp("tfds"))


def test_splits_labels_and_class_names(built):
  splits = {k: v.num_examples for k, v in built.info.splits.items()}
  assert splits == {"train": 12, "validation": 3, "test": 6}  # 15 train objects: 20% held out
  names = built.info.features["label"].names
  assert len(names) == 40 and names[0] == "airplane" and names[-1] == "xbox"
  sources = built.as_data_source()
  objects = {s: [e["object"] for e in _all(sources[s])] for s in splits}
  assert not set(objects["train"]) & set(objects["validation"])
  for _split, examples in ((s, _all(sources[s])) for s in splits):
    for e in examples:
      obj = e["object"].decode() if isinstance(e["object"], bytes) else e["object"]
      assert names[e["label"]] == obj.rsplit("_", 1)[0]  # airplane_0003 -> airplane
      assert e["view_0"].shape == e["view_1"].shape == (24, 24, 3)
      assert e["view_0"].dtype == np.uint8


@pytest.mark.parametrize("config, views", [("views_0_6", (0, 6)), ("views_0_3", (0, 3))])
def test_view_selection(config, views, tmp_path):
  source = build(tmp_path, config=config).as_data_source()["test"]
  for e in _all(source):
    for m, view in enumerate(views):
      assert e[f"view_{m}"].max() == 20 + 15 * view  # the dummy views encode their index


def test_decoded_config_equals_the_pipelines_resize_of_the_pngs(built, tmp_path):
  # views_0_6_224px does once, at build time, what the input pipeline does every epoch.
  decoded = build(tmp_path, config="views_0_6_224px").as_data_source()["test"]
  prep = Preprocess(("view_0", "view_1"), image_size=224)
  for stored, png in zip(_all(decoded), _all(built.as_data_source()["test"])):
    assert stored["view_0"].shape == (224, 224, 3) and stored["view_0"].dtype == np.uint8
    resized = prep.resize(png)
    for m in ("view_0", "view_1"):
      np.testing.assert_array_equal(stored[m], resized[m])


def test_archive_equals_folder(built, tmp_path):
  archive_dir = tmp_path / "manual"
  archive_dir.mkdir()
  with tarfile.open(archive_dir / "shaded_images.tar.gz", "w:gz") as tar:
    tar.add(DUMMY / mn.ROOT_NAME, arcname=mn.ROOT_NAME)
  from_tar = build(tmp_path / "tfds", manual_dir=archive_dir).as_data_source()["test"]
  from_folder = built.as_data_source()["test"]
  key = lambda e: e["object"]
  for a, b in zip(sorted(_all(from_tar), key=key), sorted(_all(from_folder), key=key)):
    np.testing.assert_array_equal(a["view_1"], b["view_1"])
    assert a["label"] == b["label"]


def test_missing_and_malformed_renders(tmp_path):
  with pytest.raises(FileNotFoundError, match="modelnet40_images_new_12x"):
    check_manual_dir(tmp_path)
  broken = tmp_path / "broken"
  shutil.copytree(DUMMY, broken)
  (broken / mn.ROOT_NAME / "bed" / "test" / "bed_0006.obj.shaded_v007.png").unlink()
  with pytest.raises(FileNotFoundError, match=r"Missing view .*bed_0006.obj.shaded_v007.png"):
    build(tmp_path / "tfds1", manual_dir=broken)
  (broken / mn.ROOT_NAME / "bed" / "test" / "bed_0006.obj.shaded_v007.png").write_bytes(b"junk")
  with pytest.raises(ValueError, match="bed_0006.obj.shaded_v007.png is not a readable PNG"):
    build(tmp_path / "tfds2", manual_dir=broken)


def test_cli_trains_modelnet40_with_the_authors_recipe(modelnet40_study):
  study_dir, result = modelnet40_study  # the CLI run of tests/conftest.py
  workdir = study_dir / "guided" / "seed_0"
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["test_examples"] == 6 and "test_biased_accuracy" not in summary
  assert 0 <= summary["test_accuracy"] <= 1
  # 6 test objects: a branch may score 0, which leaves the rates undefined (None).
  assert summary["d_util"] is None or np.isfinite(summary["d_util"])
  epochs = epoch_rows(workdir)
  # 12 training objects, batch 4: 3 steps per epoch. The first epoch sets the best loss;
  # each later one is a plateau (threshold 0.99, patience 0): x0.3 for the next epoch.
  assert [e["step"] for e in epochs] == [3, 6, 9]
  assert [e["learning_rate"] for e in epochs] == pytest.approx([0.1, 0.1, 0.03])
