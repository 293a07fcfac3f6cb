"""CREMA-D (Cao et al., IEEE TAC 2014): 7,442 clips of 91 actors speaking 12 sentences with
six emotions, as the field's balancing papers use it (OGM-GE's split and preprocessing).

Modalities: ``audio`` (m_0), the log-magnitude spectrogram of the clip's WAV, float32[257,
188, 1] (:func:`data_prep.av_media.spectrogram`); ``visual`` (m_1), the first ``frames``
frames at 1 fps of its FLV video, uint8[frames, size, size, 3]. Both are decoded from the
release's files at build time, so training never decodes audio or video.

Labels in the reference's order: NEU 0, HAP 1, SAD 2, FEA 3, DIS 4, ANG 5. Splits: the
reference's ``train.csv`` / ``test.csv`` (6,698 / 744 clips; shipped in ``reference_split/``)
or the manual directory's own; ``validation`` = 10% of the train list (fixed seed), ``train``
the rest. A clip whose audio or video is missing or unreadable is left out and named in one
line. See README.md for every difference from the reference code.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from data_prep import av_media

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")  # OGM-GE's label order
VALIDATION_FRACTION = 0.1
_VALIDATION_SEED = 7442
REFERENCE_SPLIT = pathlib.Path(__file__).resolve().parent / "reference_split"
INSTRUCTIONS = (
    "Put the CREMA-D release (github.com/CheyneyComputerScience/CREMA-D) in the manual "
    "directory: AudioWAV/<name>.wav and VideoFlash/<name>.flv for every clip, <name> = "
    "<actor>_<sentence>_<EMO>_<level> (e.g. 1001_DFA_ANG_XX). Optionally train.csv and "
    "test.csv (one '<name>,<EMO>' a line) to use another split than the reference's.")


@dataclasses.dataclass
class ClipsConfig(tfds.core.BuilderConfig):
  """``frames``: frames at 1 fps kept per clip (the first ones); ``image_size``: their
  square size (the reference's 224)."""

  frames: int = 1
  image_size: int = 224


def read_list(path: pathlib.Path) -> list[tuple[str, int]]:
  """``(name, label)`` of every ``<name>,<EMO>`` line of a split list (BOM, CR and blank
  lines ignored); an unknown emotion is an error naming the line."""
  out = []
  text = pathlib.Path(path).read_text(encoding="utf-8-sig")
  for number, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line:
      continue
    name, _, emotion = line.partition(",")
    if emotion.strip() not in EMOTIONS:
      raise ValueError(f"{path}:{number}: {line!r} is not '<name>,<EMO>' with EMO one of "
                       f"{EMOTIONS}.")
    out.append((name.strip(), EMOTIONS.index(emotion.strip())))
  return out


def split_lists(manual_dir: pathlib.Path) -> dict[str, list[tuple[str, int]]]:
  """train / validation / test clips: the manual directory's train.csv and test.csv when it
  has both, else the reference's; validation carved from train with a fixed seed."""
  folder = manual_dir if all((manual_dir / f"{s}.csv").is_file()
                             for s in ("train", "test")) else REFERENCE_SPLIT
  train, test = read_list(folder / "train.csv"), read_list(folder / "test.csv")
  order = np.random.default_rng(_VALIDATION_SEED).permutation(len(train))
  n_val = int(round(len(train) * VALIDATION_FRACTION))
  return {"train": [train[i] for i in sorted(order[n_val:])],
          "validation": [train[i] for i in sorted(order[:n_val])], "test": test}


def check_manual_dir(directory) -> None:
  """Fails with the expected layout unless ``directory`` has AudioWAV/ and VideoFlash/."""
  directory = pathlib.Path(directory)
  missing = [d for d in ("AudioWAV", "VideoFlash") if not (directory / d).is_dir()]
  if missing:
    raise FileNotFoundError(f"{directory} has no {' or '.join(missing)}/. {INSTRUCTIONS}")


def decode_clip(manual_dir: pathlib.Path, name: str, frames: int, size: int) -> dict:
  """The example features of clip ``name`` (raises ClipError naming what is wrong)."""
  audio = av_media.spectrogram(av_media.load_audio(manual_dir / "AudioWAV" / f"{name}.wav"))
  visual = av_media.clip_frames(manual_dir / "VideoFlash" / f"{name}.flv", range(frames), size)
  return {"audio": audio[..., None], "visual": visual}


class Builder(tfds.core.GeneratorBasedBuilder):
  """CREMA-D: spectrogram and frames of each clip."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [ClipsConfig(name=f"frames_{n}", frames=n,
                                 description=f"{n} frame(s) at 1 fps, 224x224")
                     for n in (1, 2, 3)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return self.dataset_info_from_configs(
        description=__doc__,
        features=av_media.clip_features(c, tfds.features.ClassLabel(names=EMOTIONS)),
        homepage="https://github.com/CheyneyComputerScience/CREMA-D",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    check_manual_dir(manual_dir)
    return {split: self._generate_examples(manual_dir, clips)
            for split, clips in split_lists(manual_dir).items()}

  def _generate_examples(self, manual_dir: pathlib.Path, clips):
    c = self.builder_config
    decode = lambda clip: decode_clip(manual_dir, clip[0], c.frames, c.image_size)
    for (name, label), features in av_media.decoded_in_order(clips, decode):
      if isinstance(features, av_media.ClipError):
        print(f"CREMA-D: left out {name}: {features}")
        continue
      yield name, {**features, "label": label, "clip": name}
