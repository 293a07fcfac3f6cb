"""Every registered method, as the runner builds it: every metric its train step returns
reaches steps.jsonl (under its declared key), TensorBoard and the study's aggregate."""

import json
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_helpers import read_jsonl, tiny_config

import gml_jax
from gml_jax.extras import metric_keys
from gml_jax.runner import build, logs, methods, names, study_report
from gml_jax.runner.loop import MetricFetcher
from gml_jax.runner.trainer import _method_templates, _step_means
from gml_jax.steps import create_train_state, make_train_step

# Each method's first variant (a method whose name is no variant, fixed, runs as fixed_0).
VARIANTS = {v: m for v, m in reversed(methods.variants().items())}
FIRST = {m: v for v, m in VARIANTS.items()}


class TinyBranch(nn.Module):
  def setup(self):
    self.stem, self.head = nn.Dense(4), nn.Dense(3)


class TinyFusion(nn.Module):
  """The layout of gml_jax's FusionNetwork (what the runner's labels read), in a few dense
  layers: two branches, a fusion layer with a shared squeeze, an excitation and a cut per
  branch. It compiles in a second; the metrics and logs do not depend on the backbone."""

  def setup(self):
    self.branches = [TinyBranch() for _ in range(2)]  # Linen names them branches_<k>
    self.fusion_0 = TinyExcite()

  def __call__(self, inputs, *, train, cut=-1, drop=None):
    h = [b.stem(x) for b, x in zip(self.branches, inputs)]
    fused = self.fusion_0(h, train=train, cut=cut, drop=drop)
    for f in fused:  # gml_jax.extras' features, as FusionNetwork sows its pooled features
      self.sow("intermediates", "features", f)
    z = jnp.stack([b.head(f) for b, f in zip(self.branches, fused)])
    return jnp.mean(z, axis=0), z


class TinyExcite(nn.Module):
  @nn.compact
  def __call__(self, h, *, train, cut, drop):
    squeezed = nn.Dense(2, name="squeeze")(jnp.concatenate(h, axis=-1))
    return [x * gml_jax.CrossModalCut(branch=k, name=f"cut_{k}")(
        nn.Dense(4, name=f"excite_{k}")(squeezed), train=train, cut=cut, drop=drop)
            for k, x in enumerate(h)]


def tensorboard_scalars(folder) -> dict[str, list[float]]:
  """tag -> values of the event files in ``folder`` (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for path in folder.iterdir():
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append(value.simple_value)
  return scalars


@pytest.mark.parametrize("method", methods.names())
def test_every_metric_of_a_method_reaches_the_logs_and_the_study(method, tmp_path):
  config = tiny_config(FIRST[method], tmp_path)
  model = TinyFusion()
  tx = build.optimizer(config, steps_per_epoch=5, num_classes=3, feature_dims=lambda: (4, 4))
  rng = np.random.default_rng(0)
  batch = {"inputs": tuple(rng.random((8, 5), np.float32) for _ in range(2)),
           "label": rng.integers(0, 3, 8).astype(np.int32)}
  state = create_train_state(model, tx, batch["inputs"])
  step = jax.jit(make_train_step(model, tx, labels=gml_jax.group_labels,
                                 loss=build.loss(config)))
  templates = names.STEP_METRICS | metric_keys(state.opt_state)
  fetcher = MetricFetcher(config.data.modalities, templates)
  for _ in range(2):
    state, metrics = step(state, batch)
    fetcher.add(metrics, 1)
  run_logs = logs.RunLogs(tmp_path, 0, write=True, config=config.to_dict())
  run_logs.add_steps(fetcher.fetch(step=2, sync=True))
  run_logs.close()

  rows = read_jsonl(tmp_path / "metrics" / "steps.jsonl")
  expected = {names.row_key(templates[k], m) if names.per_modality(templates[k])
              else templates[k] for k in metrics for m in config.data.modalities}
  assert [r["step"] for r in rows] == [1, 2] and all(set(r) == {"step"} | expected
                                                      for r in rows)
  tensorboard = tensorboard_scalars(tmp_path / "tensorboard")
  assert {f"train/{k}" for k in expected} <= set(tensorboard)
  # The study: the method's own metrics (not the step's or the speeds') as run means.
  own = _method_templates(state)
  summary = {names.MODALITIES: list(config.data.modalities)} | _step_means(
      rows, own, config.data.modalities)
  assert set(summary) - {names.MODALITIES} == {
      names.step_mean(k) for k in names.method_step_keys(config.data.modalities, own)}
  (group,) = study_report.aggregate([{"method": method, "seed": 0, "point": "",
                                      "summary": summary}])["groups"]
  assert set(summary) - {names.MODALITIES} <= set(group["metrics"])
  json.dumps(group)  # study.json holds it as it is


def test_registered_methods_declare_what_their_states_report():
  for name in methods.names():
    method = methods.get(name)
    assert method.state_types, name
    for state in method.state_types:
      assert set(getattr(state, "NEEDS", ())) <= set(__import__("gml_jax").EXTRA_ARGS)
      assert all(isinstance(t, str) for t in state.METRICS.values())
    for variant, baseline in method.comparisons:
      assert variant in VARIANTS and baseline in VARIANTS, (name, variant, baseline)


def test_the_flat_fields_of_the_old_layout_are_refused_naming_the_new_field(tmp_path):
  from gml_jax.runner import workdir

  config = tiny_config("ogm_ge", tmp_path)
  config.balance.ogm_alpha = 0.5  # a config file of the old layout
  with pytest.raises(ValueError, match=r"^config.balance.ogm_alpha is the old layout: a "
                                       r"method's options now live under its name; use "
                                       r"config.balance.ogm_ge.alpha.$"):
    build.check_config(config)
  # A workdir that a run of the old layout made: refused, saying how to go on.
  config = tiny_config("guided", tmp_path)
  saved = workdir.resolved_config(config, None)
  saved["balance"] = {"method": "guided", "alpha": 0.01, "window": 5, "update_mode": "branch"}
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match=r"was made before 0.4 \(flat config fields "
                                       r"balance.alpha, ...\): this version keeps a method's "
                                       r"options under its name and cannot resume it. Finish "
                                       r"it with the version that made it"):
    workdir.check_workdir_config(tmp_path, config)
  assert json.loads((tmp_path / "config.json").read_text()) == saved  # left as it was


def test_the_new_methods_cross_checks_name_the_field(tmp_path):
  config = tiny_config("mmpareto", tmp_path)
  assert build.loss(config) == "both"  # the fused output's and every branch's loss
  config.model.fusion, config.model.head = "none", "joint"
  with pytest.raises(ValueError, match=r"method='mmpareto' trains the fused output's and "
                                       r"every branch's own loss, .*model.head='branch'"):
    build.check_config(config)
  config = tiny_config("agm", tmp_path)
  config.balance.agm.clip = 1.0
  with pytest.raises(ValueError, match=r"config.balance.agm.clip watches the head's gradient"):
    build.check_config(config)
  config = tiny_config("inforeg", tmp_path)
  config.balance.inforeg.window_modality = 2
  with pytest.raises(ValueError, match=r"window_modality=2 is invalid: expected -1 or a "
                                       r"branch in \[0, 2\)"):
    build.check_config(config)
  with pytest.raises(ValueError, match="pmr needs the dataset's classes"):
    build.optimizer(tiny_config("pmr", tmp_path), steps_per_epoch=5)


def test_the_trainers_epoch_start_sets_prototypes_and_anchors(monkeypatch, tmp_path):
  """trainer._start_epoch: PMR's prototypes are the class means (NumPy) of the model's sown
  features over the epoch pass's batches; InfoReg's anchor is the parameters; a run whose
  transforms have no epoch hook is left as it is."""
  import types

  from gml_jax import inforeg, pmr
  from gml_jax.runner import trainer
  from gml_jax.runner.loop import TrainClock

  rng = np.random.default_rng(1)
  batches = [{"inputs": tuple(rng.random((6, 5), np.float32) for _ in range(2)),
              "label": np.array([0, 1, 0, 1, 1, 0], np.int32)} for _ in range(2)]
  monkeypatch.setattr(trainer, "_epoch_pass_batches", lambda run: iter(batches))
  model = TinyFusion()
  run = types.SimpleNamespace(clock=TrainClock(), cache={}, model=model,
                              dataset=types.SimpleNamespace(num_classes=3))
  for variant in ("pmr", "inforeg", "vanilla"):
    tx = build.optimizer(tiny_config(variant, tmp_path), steps_per_epoch=5, num_classes=3,
                         feature_dims=lambda: (4, 4))
    state = create_train_state(model, tx, batches[0]["inputs"])
    new = trainer._start_epoch(run, state)
    if variant == "vanilla":
      assert new is state
      continue
    if variant == "inforeg":
      anchor = inforeg.inforeg_state(new.opt_state).anchor
      jax.tree.map(np.testing.assert_array_equal, anchor, state.params)
      continue
    found = pmr.pmr_state(new.opt_state)
    feats = [model.apply(state.variables, b["inputs"], train=False,
                         mutable=["intermediates"])[1]["intermediates"]["features"]
             for b in batches]
    labels = np.concatenate([b["label"] for b in batches])
    for k in range(2):
      f = np.concatenate([np.asarray(x[k]) for x in feats])
      for c in range(2):
        np.testing.assert_allclose(found.prototypes[k][c], f[labels == c].mean(0), rtol=1e-5)
    np.testing.assert_array_equal(found.valid, [True, True, False])  # class 2: no example
    assert int(found.epochs_started) == 1 and run.clock.sections["epoch passes"] > 0
