"""Network structure: parameter counts, fusion placement, group labels."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gml_jax


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(model, inputs):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), inputs, train=False))


def test_resnet18_pair_matches_known_architecture():
  model = gml_jax.resnet18_fusion(num_classes=40)
  variables = _shapes(model, [jnp.zeros((1, 64, 64, 3))] * 2)
  params = variables["params"]
  # torchvision's resnet18 has 11,689,512 parameters, of which 513,000 in its 1000-way fc.
  trunk = 11_689_512 - 513_000
  for k in range(2):
    assert _count(params[f"branches_{k}"]) == trunk + 512 * 40 + 40
  # MMTM after layer2, layer3, layer4: C = 128, 256, 512 per branch, squeeze to C.
  for i, c in enumerate((128, 256, 512)):
    fusion = params[f"fusion_{i}"]
    assert fusion["squeeze"]["kernel"].shape == (2 * c, c)
    assert fusion["excite_0"]["kernel"].shape == fusion["excite_1"]["kernel"].shape == (c, c)
  assert sorted(params) == ["branches_0", "branches_1", "fusion_0", "fusion_1", "fusion_2"]


def test_small_cnn_matches_spec_layers():
  model = gml_jax.small_cnn_fusion(num_classes=10)
  params = _shapes(model, [jnp.zeros((1, 28, 28, 1)), jnp.zeros((1, 28, 28, 3))])["params"]
  conv_bn = lambda cin, cout, k: k * k * cin * cout + 2 * cout
  gray = conv_bn(1, 32, 5) + conv_bn(32, 32, 3) + conv_bn(32, 64, 3) + conv_bn(64, 64, 3) + 650
  assert _count(params["branches_0"]) == gray
  assert _count(params["branches_1"]) == gray + 5 * 5 * 2 * 32  # 3 input channels, not 1
  # MMTM after stage 2 and stage 3, both on 64 + 64 channels: 128 -> 64 -> 2 x 64.
  for i in range(2):
    assert _count(params[f"fusion_{i}"]) == 128 * 64 + 64 + 2 * (64 * 64 + 64)


def test_group_labels_cover_every_collection():
  model = gml_jax.small_cnn_fusion(num_classes=10, num_modalities=3, width=4)
  variables = model.init(jax.random.key(0), [jnp.zeros((1, 8, 8, 1))] * 3, train=False)
  labels = gml_jax.group_labels(variables["params"])
  assert set(jax.tree.leaves(labels)) == {
      "main:0", "main:1", "main:2", "fusion:0", "fusion:1", "fusion:2", "fusion:shared"}
  assert set(jax.tree.leaves(labels["branches_2"])) == {"main:2"}
  assert labels["fusion_1"]["excite_2"] == {"kernel": "fusion:2", "bias": "fusion:2"}
  assert set(jax.tree.leaves(labels["fusion_0"]["squeeze"])) == {"fusion:shared"}
  stats = gml_jax.group_labels(variables["fusion_stats"])
  assert stats["fusion_0"]["cut_1"]["running_mean"] == "fusion:1"
  assert set(jax.tree.leaves(gml_jax.group_labels(variables["batch_stats"]))) == {
      "main:0", "main:1", "main:2"}


def test_network_rejects_bad_layouts():
  stages = lambda: gml_jax.models.backbone("small_cnn").stages(4)
  bad_fusion = gml_jax.fusion_network(stages, 2, 3, fusion_after=(1, 5))
  with pytest.raises(ValueError, match="fusion_after"):
    bad_fusion.init(jax.random.key(0), [jnp.zeros((1, 8, 8, 1))] * 2, train=False)
  model = gml_jax.small_cnn_fusion(3, width=4)
  with pytest.raises(ValueError, match="Expected 2 modality inputs, got 3"):
    model.init(jax.random.key(0), [jnp.zeros((1, 8, 8, 1))] * 3, train=False)


def test_backbones_are_found_by_name_from_their_files():
  files = sorted(p.stem for p in pathlib.Path(gml_jax.models.backbones.__path__[0]).glob("*.py")
                 if not p.stem.startswith("_"))
  assert gml_jax.models.BACKBONES == tuple(files) == (
      "av_resnet18", "i3d", "mlp", "resnet18", "small_cnn")
  assert gml_jax.models.backbone_options("small_cnn") == ("width",)
  assert gml_jax.models.backbone_options("resnet18") == ("width", "max_blocks")
  assert gml_jax.models.backbone_defaults("i3d") == {"width": 64, "max_blocks": 4}
  inputs = [jnp.zeros((1, 28, 28, 1)), jnp.zeros((1, 28, 28, 3))]
  built = _shapes(gml_jax.models.build("small_cnn", 10, width=8, ratio=2), inputs)
  direct = _shapes(gml_jax.fusion_network(
      lambda: gml_jax.models.backbone("small_cnn").stages(8), 2, 10, fusion_after=(1, 2),
      ratio=2), inputs)
  assert jax.tree.map(lambda x: x.shape, built) == jax.tree.map(lambda x: x.shape, direct)
  with pytest.raises(ValueError, match="Unknown backbone 'vgg'.*small_cnn"):
    gml_jax.models.build("vgg", 10)


def test_av_resnet18_pools_frames_over_time_and_reads_a_one_channel_spectrogram():
  model = gml_jax.models.build("av_resnet18", 6, 2, fusion=False, width=4, max_blocks=1)
  rng = np.random.default_rng(0)
  audio = jnp.asarray(rng.normal(size=(4, 17, 12, 1)), jnp.float32)
  a, b = (jnp.asarray(rng.normal(size=(2, 1, 16, 16, 3)), jnp.float32) for _ in range(2))
  clips = jnp.concatenate([jnp.concatenate([a, b], 1)] * 2)  # 4 clips of 2 frames
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))([audio, clips])
  assert variables["params"]["branches_0"]["stages_0"]["stage"]["ConvBNReLU_0"]["Conv_0"][
      "kernel"].shape == (7, 7, 1, 4)  # one input channel on the spectrogram
  logits = jax.jit(lambda frames: model.apply(variables, [audio, frames], train=False)[1][1])
  # every frame goes through the same 2-D net and the head is linear after a mean over
  # time and space: a two-frame clip's logits are the mean of each frame's alone
  alone = logits(jnp.concatenate([a, b]))  # 4 clips of 1 frame: a's two, then b's two
  np.testing.assert_allclose(logits(clips)[:2], (alone[:2] + alone[2:]) / 2, rtol=1e-4,
                             atol=1e-5)


def test_av_resnet18_has_torchvisions_resnet18_per_branch_and_mmtm_after_layers_2_to_4():
  model = gml_jax.models.build("av_resnet18", 6, 2)
  params = _shapes(model, [jnp.zeros((1, 257, 188, 1)), jnp.zeros((1, 2, 64, 64, 3))])["params"]
  trunk = 11_689_512 - 513_000  # torchvision's resnet18 without its fc
  assert _count(params["branches_1"]) == trunk + 512 * 6 + 6
  assert _count(params["branches_0"]) == trunk - 7 * 7 * 2 * 64 + 512 * 6 + 6  # 1 channel in
  for i, c in enumerate((128, 256, 512)):
    assert params[f"fusion_{i}"]["squeeze"]["kernel"].shape == (2 * c, c)
