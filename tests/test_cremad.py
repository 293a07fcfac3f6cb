"""The CREMA-D builder on generated clips laid out like the release (data_prep/cremad/
make_dummy_data.py), and the audio and frame pipeline against NumPy and SciPy."""

import shutil

import numpy as np
import pytest
import scipy.signal
from run_helpers import build_dataset

from data_prep import av_media
from data_prep.cremad import MODALITIES, check_manual_dir
from data_prep.cremad import cremad_dataset_builder as cb
from data_prep.cremad import make_dummy_data as dummy

DUMMY = dummy.ROOT
CONFIG = cb.ClipsConfig(name="test_3_frames_16px", frames=3, image_size=16)


def _examples(builder):
  out = {}
  for split, source in builder.as_data_source().items():
    out[split] = [source[i] for i in range(len(source))]
  return out


def _name(e):
  return e["clip"].decode() if isinstance(e["clip"], bytes) else e["clip"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return _examples(build_dataset(cb.Builder, CONFIG, tmp_path_factory.mktemp("tfds"), DUMMY))


def test_splits_labels_and_shapes(built):
  assert MODALITIES == ("audio", "visual")
  assert {s: len(e) for s, e in built.items()} == {"train": 7, "validation": 1, "test": 2}
  names = {s: sorted(_name(e) for e in es) for s, es in built.items()}
  assert sorted(names["train"] + names["validation"]) == sorted(dummy.TRAIN)
  assert names["test"] == sorted(dummy.TEST)
  for examples in built.values():
    for e in examples:
      assert e["label"] == dummy.EMOTIONS.index(_name(e).split("_")[2])  # NEU 0 ... ANG 5
      assert e["audio"].shape == (257, 188, 1) and e["audio"].dtype == np.float32
      assert e["visual"].shape == (3, 16, 16, 3) and e["visual"].dtype == np.uint8


def test_the_spectrogram_peak_is_the_labels_tone_and_frames_are_mid_second(built):
  for e in built["train"] + built["test"]:
    # the tone of label L sits in STFT bin 20 + 12 L (make_dummy_data.py)
    assert int(np.argmax(e["audio"][..., 0].mean(axis=1))) == dummy.peak_bin(e["label"])
    # 10 fps: frames round(5) = 5th, 15th, 25th (1-based) of gray 20 + 8 i
    np.testing.assert_allclose(e["visual"].reshape(3, -1).mean(axis=1), [52, 132, 212], atol=3)


def test_spectrogram_equals_scipys_stft():
  rng = np.random.default_rng(0)
  samples = rng.uniform(-1.2, 1.2, 30_000)  # 1.36 s: tiled to 3 s, clipped to [-1, 1]
  tiled = np.clip(np.concatenate([samples] * 3)[:66_150], -1, 1)
  _, _, z = scipy.signal.stft(tiled, window="hann", nperseg=512, noverlap=512 - 353,
                              boundary="even", padded=False)
  # scipy scales by 1 / sum(window); its "even" extension is NumPy's "reflect"
  expected = np.log(np.abs(z) * scipy.signal.get_window("hann", 512).sum() + 1e-7)
  got = av_media.spectrogram(samples)
  assert got.shape == expected.shape == (257, 188)
  np.testing.assert_allclose(got, expected, atol=2e-4)


def test_frame_indices_follow_the_reference_extraction():
  # 30 fps, 75 frames (2.5 s): middles of seconds 0, 1, 2 are the 15th, 45th, 75th frames;
  # past the end, the reference's 1-based 61 + (p - 61) mod 15 for p = 105, 135: 75 twice
  assert av_media.frame_indices(range(5), 30, 75) == [14, 44, 74, 74, 74]
  # 10 fps, 23 frames: positions 5, 15, then 25, 35, 45 -> 21 + (p - 21) mod 3 = 22, 23, 21
  assert av_media.frame_indices(range(5), 10, 23) == [4, 14, 21, 22, 20]
  # 25 fps: Python's round (the reference's too) halves to even: 12.5 -> 12, 37.5 -> 38
  assert av_media.frame_indices(range(3), 25, 250) == [11, 37, 61]


def test_reference_split_lists():
  lists = {s: cb.read_list(cb.REFERENCE_SPLIT / f"{s}.csv") for s in ("train", "test")}
  assert (len(lists["train"]), len(lists["test"])) == (6698, 744)
  raw = (cb.REFERENCE_SPLIT / "test.csv").read_text().split()
  assert [e for _, e in lists["test"]] == [dummy.EMOTIONS.index(line.split(",")[1])
                                           for line in raw]
  assert not {n for n, _ in lists["train"]} & {n for n, _ in lists["test"]}


def test_a_missing_or_unreadable_clip_is_left_out_and_named(tmp_path, capsys):
  manual = tmp_path / "manual"
  shutil.copytree(DUMMY, manual)
  (manual / "VideoFlash" / "1005_DFA_SAD_XX.flv").unlink()
  (manual / "AudioWAV" / "1001_DFA_NEU_XX.wav").write_bytes(b"not a wav")
  config = cb.ClipsConfig(name="test_1_frame_8px", frames=1, image_size=8)
  examples = _examples(build_dataset(cb.Builder, config, tmp_path / "tfds", manual))
  assert [_name(e) for e in examples["test"]] == ["1005_IOM_NEU_XX"]
  assert "1001_DFA_NEU_XX" not in [_name(e) for e in examples["train"]]
  assert len(examples["train"]) + len(examples["validation"]) == 7
  lines = [line for line in capsys.readouterr().out.splitlines() if "left out" in line]
  assert len(lines) == 2
  assert any("1005_DFA_SAD_XX" in line and "flv is missing" in line for line in lines)
  assert any("1001_DFA_NEU_XX" in line and "not readable audio" in line for line in lines)


def test_bad_manual_dirs_and_lists_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"has no AudioWAV or VideoFlash/"):
    check_manual_dir(tmp_path)
  bad = tmp_path / "train.csv"
  bad.write_text("1001_DFA_NEU_XX,NEU\n1001_DFA_XXX_XX,XXX\n")
  with pytest.raises(ValueError, match=r"train.csv:2: '1001_DFA_XXX_XX,XXX' is not"):
    cb.read_list(bad)
