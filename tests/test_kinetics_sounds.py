"""The Kinetics-Sounds builder on generated clips in both layouts it reads
(data_prep/kinetics_sounds/make_dummy_data.py)."""

import numpy as np
import pytest
from run_helpers import build_dataset

from data_prep.kinetics_sounds import check_manual_dir
from data_prep.kinetics_sounds import kinetics_sounds_dataset_builder as kb
from data_prep.kinetics_sounds import make_dummy_data as dummy


def _build(tmp_path, layout):
  config = kb.ClipsConfig(name=f"test_{layout}_16px", frames=3, image_size=16)
  builder = build_dataset(kb.Builder, config, tmp_path / "tfds", dummy.ROOT / layout)
  examples = {}
  for split, source in builder.as_data_source().items():
    examples[split] = [source[i] for i in range(len(source))]
  return builder, examples


def _clip(e):
  return e["clip"].decode() if isinstance(e["clip"], bytes) else e["clip"]


def test_clips_layout_labels_by_class_folder_and_user_class_list(tmp_path):
  builder, examples = _build(tmp_path, "clips")
  assert builder.info.metadata["classes"] == list(dummy.CLASSES)  # the user's classes.txt
  assert {s: len(e) for s, e in examples.items()} == {"train": 5, "validation": 1, "test": 2}
  assert sorted(_clip(e) for e in examples["test"]) == [
      "test/playing bagpipes/a2.mp4", "test/ripping paper/c2.mp4"]
  for e in sum(examples.values(), []):
    assert e["label"] == dummy.CLASSES.index(_clip(e).split("/")[1])
    assert e["audio"].shape == (257, 188, 1) and e["audio"].dtype == np.float32
    assert int(np.argmax(e["audio"][..., 0].mean(axis=1))) == dummy.peak_bin(e["label"])
    # 3 frames from seconds 0, 3, 6 of 10 (a 5-s clip at 10 fps, 50 frames): the 5th,
    # the 35th, and, past its end, the 45th (last second again): grays 20 + 4 i
    assert e["visual"].shape == (3, 16, 16, 3) and e["visual"].dtype == np.uint8
    np.testing.assert_allclose(e["visual"].reshape(3, -1).mean(axis=1), [36, 156, 196], atol=3)


def test_extracted_layout_reads_the_lists_labels_and_picks_frames_1_4_7(tmp_path):
  builder, examples = _build(tmp_path, "extracted")
  assert builder.info.metadata["classes"] == [str(i) for i in range(31)]  # the reference's
  assert {s: len(e) for s, e in examples.items()} == {"train": 3, "validation": 1, "test": 2}
  labels = dict(dummy.EXTRACTED["train"] + dummy.EXTRACTED["test"])
  for e in sum(examples.values(), []):
    assert e["label"] == labels[_clip(e)]
    assert int(np.argmax(e["audio"][..., 0].mean(axis=1))) == dummy.peak_bin(e["label"])
    # frame_00001, _00004, _00007 of gray 20 + 20 k (k = 0, 3, 6); JPEG keeps a flat gray
    np.testing.assert_allclose(e["visual"].reshape(3, -1).mean(axis=1), [20, 80, 140], atol=2)


def test_reference_lists_and_frame_choice():
  train = kb.read_reference_list(kb.REFERENCE_SPLIT / "my_train.txt", 31)
  test = kb.read_reference_list(kb.REFERENCE_SPLIT / "my_test.txt", 31)
  assert (len(train), len(test)) == (14_799, 2_597)
  assert {label for _, label in train} == set(range(31))
  assert kb.frame_seconds(3) == [0, 3, 6] and kb.frame_seconds(1) == [0]


def test_unknown_class_folders_and_bad_lists_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="No Kinetics-Sounds clips"):
    check_manual_dir(tmp_path)
  for split in ("train", "test"):
    (tmp_path / split / "playing drums").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"playing drums is not in the class list \(31 classes"):
    kb.clip_lists(tmp_path, kb.REFERENCE_CLASSES)
  bad = tmp_path / "my_train.txt"
  bad.write_text("abc_1,10,31\n")
  with pytest.raises(ValueError, match=r"my_train.txt:1: 'abc_1,10,31' is not"):
    kb.read_reference_list(bad, 31)
