"""The metric writers: JSONL, TensorBoard and Weights & Biases (offline: no network)."""

import importlib.util
import json
import pathlib
import struct

import pytest
from run_helpers import read_jsonl, tiny_config

from gml_jax.runner import build, logs, trainer

WANDB_HEADER = 7  # ":W&B", a 2-byte magic, a version byte
BLOCK = 32768  # the records are LevelDB log records in blocks of this size


def wandb_records(path: pathlib.Path) -> list:
  """The protobuf records of a W&B offline run file (.wandb), read without W&B's reader
  (its Go core has none for Python): LevelDB log framing, each record a ``Record``."""
  from wandb.proto import wandb_internal_pb2

  data, pos, records, pending = path.read_bytes(), WANDB_HEADER, [], b""
  while pos + 7 <= len(data):
    if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
      pos += BLOCK - pos % BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:
      break
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a full record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b""
  return records


def _items(items) -> dict:
  """A record's items (key, or nested key joined by '/') -> value."""
  return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def test_a_run_logs_its_scalars_config_and_summary_to_wandb_offline(data_dir, tmp_path):
  config = tiny_config("unimodal_0", data_dir)
  config.num_epochs, config.log_every_steps = 1, 1
  config.logging.wandb.project, config.logging.wandb.mode = "gml-jax-tests", "offline"
  summary = trainer.train_and_evaluate(config, tmp_path / "run")
  (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
  records = wandb_records(run_file)
  history = [_items(r.history.item) for r in records
             if r.WhichOneof("record_type") == "history"]
  steps = read_jsonl(tmp_path / "run" / "metrics" / "steps.jsonl")
  # the last step row of each metrics fetch (as TensorBoard gets them), under the same names
  logged = {h["_step"]: h for h in history if "train/loss" in h}
  assert steps[-1]["step"] in logged and set(logged) <= {r["step"] for r in steps}
  for row in (r for r in steps if r["step"] in logged):
    assert logged[row["step"]]["train/loss"] == pytest.approx(row["loss"], rel=1e-6)
    assert logged[row["step"]]["train/branch_0_accuracy"] == pytest.approx(
        row["branch_0_accuracy"], rel=1e-6)
  epoch = read_jsonl(tmp_path / "run" / "metrics" / "epochs.jsonl")[-1]
  assert any(h.get("epoch/val_accuracy") == pytest.approx(epoch["val_accuracy"])
             for h in history)
  run_config = next(r.run.config for r in records if r.WhichOneof("record_type") == "run")
  values = {u.key: json.loads(u.value_json) for u in run_config.update}
  assert values["balance"]["method"] == "vanilla" and values["num_epochs"] == 1
  final = {}
  for r in records:
    if r.WhichOneof("record_type") == "summary":
      final |= _items(r.summary.update)
  assert final["test_accuracy"] == pytest.approx(summary["test_accuracy"])


def test_only_the_writing_process_has_writers(tmp_path):
  config = {"logging": {"wandb": {"project": "p", "entity": "", "mode": "offline"}}}
  quiet = logs.RunLogs(tmp_path, 0, write=False, config=config)
  assert [type(w) for w in quiet.writers] == [logs.JsonlWriter]
  quiet.add_steps([{"step": 1, "loss": 1.0}])
  quiet.close()
  assert not list(tmp_path.iterdir())  # nothing written


def test_wandb_without_its_extra_is_one_line_naming_the_extra(monkeypatch, tmp_path):
  config = tiny_config("vanilla", tmp_path)
  config.logging.wandb.project = "mine"
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else real(name, *a))
  with pytest.raises(ValueError, match=r"config.logging.wandb.project='mine' needs Weights & "
                                       r"Biases, which is not installed: pip install -e "
                                       r"'.\[wandb\]'."):
    build.check_config(config)
  config.logging.wandb.project, config.logging.wandb.mode = "", "sometimes"
  with pytest.raises(ValueError, match=r"config.logging.wandb.mode='sometimes' is unknown"):
    build.check_config(config)
