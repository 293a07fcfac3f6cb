"""What a config describes (gml_jax/runner/build.py): backbone options under the backbone's
name, datasets and variants from the clone's one vocabulary."""

import jax
import numpy as np
import pytest
from run_helpers import tiny_config

from experiments import colored_mnist, modelnet40, nvgesture
from gml_jax import models
from gml_jax.runner import build, clone, names, trainer


def test_backbone_options_sit_under_the_backbone_and_reach_it():
  config = colored_mnist.get_config()
  assert "width" not in config.model and config.model.small_cnn.width == 32
  config.model.small_cnn.width = 8
  inputs = tuple(np.zeros((1, 28, 28, c), np.float32) for c in (1, 3))
  params = build.model(config, 10).init(jax.random.key(0), inputs, train=False)["params"]
  assert params["branches_0"]["stages_0"]["ConvBNReLU_0"]["Conv_0"]["kernel"].shape[-1] == 8
  for other in (modelnet40.get_config(), nvgesture.get_config()):  # the full network
    assert other.model[other.model.name].to_dict() == models.backbone_defaults(other.model.name)
    assert "small_cnn" not in other.model


@pytest.mark.parametrize("name,width,shape", [("resnet18", 64, (32, 32, 3)),
                                              ("resnet18", 8, (32, 32, 3)),
                                              ("i3d", 64, (8, 32, 32, 3)),
                                              ("i3d", 8, (8, 32, 32, 3))])
def test_a_narrower_backbone_scales_every_layer(name, width, shape):
  """``width`` = 64 is the published network; a narrower one divides every channel count."""
  full = _channels(name, 64, shape)
  narrow = _channels(name, width, shape)
  assert narrow.keys() == full.keys()  # the same layers
  assert all(narrow[k] == max(1, round(full[k] * width / 64)) for k in full)
  if width == 64 and name == "resnet18":
    assert sorted(set(full.values())) == [64, 128, 256, 512]
  if width == 64 and name == "i3d":  # Mixed_5c: 384 + 384 + 128 + 128 channels
    assert full["stages_5/InceptionBlock_0/Unit3D_0/Conv_0"] == 384


@pytest.mark.parametrize("name,block,shape", [("resnet18", "BasicBlock", (32, 32, 3)),
                                              ("i3d", "InceptionBlock", (8, 32, 32, 3))])
def test_a_shallower_backbone_keeps_the_first_block_of_each_stage(name, block, shape):
  full = _channels(name, 8, shape)
  shallow = _channels(name, 8, shape, max_blocks=1)
  first = {k: c for k, c in full.items() if f"{block}_" not in k or f"{block}_0/" in k}
  assert shallow == first and len(first) < len(full)
  with pytest.raises(ValueError, match=f"{name}: max_blocks must be at least 1, got 0"):
    models.backbone(name).stages(max_blocks=0)


def _channels(name, width, shape, **options):
  """{conv path: output channels} of one branch of backbone ``name`` at ``width``."""
  import gml_jax

  model = gml_jax.models.build(name, 5, width=width, **options)
  inputs = tuple(np.zeros((1, *shape), np.float32) for _ in range(2))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs, train=False))
  flat = jax.tree_util.tree_flatten_with_path(params["params"]["branches_0"])[0]
  return {"/".join(k.key for k in path[:-1]): leaf.shape[-1] for path, leaf in flat
          if path[-1].key == "kernel" and path[-2].key.startswith("Conv")}


@pytest.mark.parametrize("option,value,message", [
    ("width", 0, r"config.model.small_cnn.width=0 is invalid: expected an integer >= 1"),
    ("depth", 3, r"config.model.small_cnn.depth is unknown: backbone 'small_cnn' takes "
                 r"\['width'\]"),
])
def test_bad_backbone_options_are_named(option, value, message):
  config = colored_mnist.get_config()
  config.model.small_cnn[option] = value
  with pytest.raises(ValueError, match=message):
    build.check_config(config)


def test_datasets_are_the_folders_of_data_prep_and_declare_their_modalities():
  assert clone.datasets() == ("colored_mnist", "cremad", "kinetics_sounds", "mfeat",
                              "modelnet40_views", "nvgesture")
  assert clone.dataset_modalities("mfeat") == ("fac", "fou", "kar", "mor", "pix", "zer")
  assert clone.dataset_modalities("colored_mnist") == ("gray", "colored")
  assert clone.dataset_modalities("nvgesture") == ("rgb", "depth")
  with pytest.raises(ValueError, match=r"Unknown dataset 'mnist': expected a builder package "
                                       r"data_prep/mnist/"):
    clone.dataset_package("mnist")


def test_every_variant_builds_a_consistent_config():
  for variant in names.VARIANTS:
    config = colored_mnist.get_config(variant)
    build.check_config(config)
    assert config.balance.method in names.BALANCE_METHODS
  assert colored_mnist.get_config().balance.method == names.DEFAULT_VARIANT
  # The controls: guided's schedule pinned to a modality, and random draws at guided's shares
  # where its windows run back to back (Q / (Q + 1) of the steps after warm-up, all on m0).
  for k in (0, 1):
    fixed = colored_mnist.get_config(f"fixed_{k}").balance
    assert (fixed.method, fixed.fixed.target) == ("fixed", k)
  matched = colored_mnist.get_config("random_matched").balance
  assert matched.method == "random" and matched.random.shares == (5 / 6, 0.0)
  assert "fixed" not in names.VARIANTS  # a variant names its target
  with pytest.raises(ValueError, match="Unknown variant 'greedy'"):
    colored_mnist.get_config("greedy")


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 12, "batch_size=12 is not divisible by the 8 devices"),
    ("eval_batch_size", 20, "eval_batch_size=20 is not divisible by the 8 devices"),
    ("batch_size", 0, r"config.batch_size=0 is invalid: expected an integer >= 1"),
    ("batch_size", -1, r"config.batch_size=-1 is invalid: expected an integer >= 1"),
    ("eval_batch_size", 0, r"config.eval_batch_size=0 is invalid: expected an integer >= 1"),
    ("num_epochs", 0, r"config.num_epochs=0 is invalid: expected an integer >= 1"),
    ("optimizer.learning_rate", float("nan"),
     r"config.optimizer.learning_rate=nan is invalid: expected a finite number > 0"),
    ("optimizer.momentum", 1.0, r"config.optimizer.momentum=1.0 is invalid: expected a finite "
     r"number in \[0, 1\)"),
    ("balance.guided.alpha", -0.5, r"config.balance.guided.alpha=-0.5 is invalid: expected a "
     "finite number >= 0"),
    ("balance.guided.window", 0, r"config.balance.guided.window=0 is invalid: expected an "
     "integer >= 1"),
    ("balance.method", "greedy", r"config.balance.method='greedy' is unknown: expected one of "
     r"\('vanilla', 'random', 'guided', 'fixed', 'ogm_ge', 'agm', 'mmpareto', 'pmr', "
     r"'inforeg'\)"),
    ("balance.guided.update_mode", "everything", "config.balance.guided.update_mode='everything' "
     "is unknown"),
    ("optimizer.name", "lion", "config.optimizer.name='lion' is unknown"),
    ("schedule.name", "cosine", "config.schedule.name='cosine' is unknown"),
    ("model.name", "vgg", "config.model.name='vgg' is unknown"),
])
def test_bad_config_values_are_refused_before_writing(field, value, message, data_dir, tmp_path):
  config = tiny_config("guided", data_dir)
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, tmp_path)
  assert not list(tmp_path.iterdir())
