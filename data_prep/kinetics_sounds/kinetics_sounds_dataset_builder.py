"""Kinetics-Sounds (Arandjelović & Zisserman, ICCV 2017): 10-s YouTube clips of the Kinetics
classes one can hear, as OGM-GE (Peng et al., CVPR 2022) uses it: 31 classes, its lists
``my_train.txt`` / ``my_test.txt`` (14,799 / 2,597 clips; shipped in ``reference_split/``).

Two layouts of the user's clips (the dataset has no release of its own):

* ``clips``: ``train/<class>/<id>.mp4`` and ``test/<class>/<id>.mp4``, each with its audio;
  the label is the class folder's place in the class list;
* ``extracted`` (the reference's pre-extracted layout): ``audio/<id>.wav`` and
  ``frames/<id>/<frame>.jpg`` (10 frames at 1 fps, file names in time order), the clips and
  labels those of the reference's lists, or of the manual directory's own
  ``my_train.txt`` / ``my_test.txt`` (``<id>,<anything>,<label index>`` a line).

The class list: the reference's 31 labels, named by their number ``"0"`` ... ``"30"`` (its
repository publishes no class names), or the manual directory's ``classes.txt`` (one class
name a line, in label order). Modalities and their preprocessing are CREMA-D's
(:mod:`data_prep.av_media`): ``audio`` float32[257, 188, 1], the spectrogram of the first
3 s; ``visual`` uint8[F, 224, 224, 3], F frames at 1 fps spread over the 10 seconds as the
reference's loader picks them (seconds 0, 3, 6 for F = 3). ``validation``: 10% of train
(fixed seed). A clip whose audio or frames are missing or unreadable is left out and named
in one line.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from data_prep import av_media

REFERENCE_SPLIT = pathlib.Path(__file__).resolve().parent / "reference_split"
REFERENCE_CLASSES = tuple(str(i) for i in range(31))  # the reference's label numbers
SECONDS = 10  # frames at 1 fps per clip, as the reference extracts them
VALIDATION_FRACTION = 0.1
_VALIDATION_SEED = 31
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi")
INSTRUCTIONS = (
    "Put Kinetics-Sounds clips in the manual directory, either as train/<class>/<id>.mp4 "
    "and test/<class>/<id>.mp4 (video with audio), or in the reference's extracted layout: "
    "audio/<id>.wav and frames/<id>/*.jpg (10 frames at 1 fps) for the clips of the "
    "reference's lists (or of your my_train.txt / my_test.txt, '<id>,<n>,<label>' a line). "
    "Optional: classes.txt, one class name a line in label order (default: the reference's "
    "31 labels, named 0 ... 30).")


@dataclasses.dataclass
class ClipsConfig(tfds.core.BuilderConfig):
  """``frames``: frames per clip, spread over its 10 s (the reference's 3); ``image_size``:
  their square size (224)."""

  frames: int = 3
  image_size: int = 224


def frame_seconds(frames: int, available: int = SECONDS) -> list[int]:
  """The seconds whose frames a clip keeps: ``seg * i`` with ``seg = available // frames``,
  as the reference's loader picks ``frame_{seg * i + 1}`` (seconds 0, 3, 6 of 10 for 3)."""
  seg = max(available // frames, 1)
  return [min(seg * i, available - 1) for i in range(frames)]


def class_list(manual_dir: pathlib.Path) -> tuple[str, ...]:
  path = manual_dir / "classes.txt"
  if not path.is_file():
    return REFERENCE_CLASSES
  names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
  if len(set(names)) != len(names) or not names:
    raise ValueError(f"{path} must list distinct class names, one a line.")
  return names


def layout(manual_dir: pathlib.Path) -> str:
  if (manual_dir / "train").is_dir() and (manual_dir / "test").is_dir():
    return "clips"
  if (manual_dir / "audio").is_dir() and (manual_dir / "frames").is_dir():
    return "extracted"
  raise FileNotFoundError(f"No Kinetics-Sounds clips in {manual_dir}. {INSTRUCTIONS}")


def check_manual_dir(directory) -> None:
  """Fails with the expected layouts unless ``directory`` holds one of them."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"Manual directory {directory} does not exist. {INSTRUCTIONS}")
  layout(directory)


def read_reference_list(path: pathlib.Path, num_classes: int) -> list[tuple[str, int]]:
  """``(id, label)`` of every ``<id>,<n>,<label>`` line; a bad line is named."""
  out = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    parts = line.strip().split(",")
    if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) >= num_classes:
      raise ValueError(f"{path}:{number}: {line!r} is not '<id>,<n>,<label>' with a label "
                       f"below {num_classes}.")
    out.append((parts[0], int(parts[2])))
  return out


def clip_lists(manual_dir: pathlib.Path, classes) -> dict[str, list[tuple[str, int]]]:
  """(key, label) per clip of train and test; the key is the clip's path relative to the
  manual directory (clips layout) or its id (extracted layout)."""
  if layout(manual_dir) == "clips":
    out = {}
    for split in ("train", "test"):
      out[split] = []
      for folder in sorted(p for p in (manual_dir / split).iterdir() if p.is_dir()):
        if folder.name not in classes:
          raise ValueError(f"Class folder {folder} is not in the class list ({len(classes)} "
                           f"classes, e.g. {classes[:3]}); give classes.txt. {INSTRUCTIONS}")
        out[split] += [(str(p.relative_to(manual_dir)), classes.index(folder.name))
                       for p in sorted(folder.iterdir()) if p.suffix in VIDEO_SUFFIXES]
    return out
  folder = manual_dir if all((manual_dir / f"my_{s}.txt").is_file()
                             for s in ("train", "test")) else REFERENCE_SPLIT
  return {s: read_reference_list(folder / f"my_{s}.txt", len(classes)) for s in ("train", "test")}


def split_lists(manual_dir: pathlib.Path, classes) -> dict[str, list[tuple[str, int]]]:
  lists = clip_lists(manual_dir, classes)
  train = lists["train"]
  order = np.random.default_rng(_VALIDATION_SEED).permutation(len(train))
  n_val = max(1, int(round(len(train) * VALIDATION_FRACTION)))  # (tfds writes no empty split)
  return {"train": [train[i] for i in sorted(order[n_val:])],
          "validation": [train[i] for i in sorted(order[:n_val])], "test": lists["test"]}


def decode_clip(manual_dir: pathlib.Path, key: str, frames: int, size: int) -> dict:
  """The example features of a clip (raises ClipError naming what is wrong)."""
  seconds = frame_seconds(frames)
  if layout(manual_dir) == "clips":
    path = manual_dir / key
    audio, visual = av_media.load_audio(path), av_media.clip_frames(path, seconds, size)
  else:
    audio = av_media.load_audio(manual_dir / "audio" / f"{key}.wav")
    folder = manual_dir / "frames" / key
    images = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
      raise av_media.ClipError(f"{folder} holds no frames")
    picked = frame_seconds(frames, len(images))
    visual = av_media.image_frames([images[i] for i in picked], size)
  return {"audio": av_media.spectrogram(audio)[..., None], "visual": visual}


class Builder(tfds.core.GeneratorBasedBuilder):
  """Kinetics-Sounds: spectrogram and frames of each clip."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [ClipsConfig(name=f"frames_{n}", frames=n,
                                 description=f"{n} frame(s) at 1 fps, 224x224")
                     for n in (3, 1)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return self.dataset_info_from_configs(
        description=__doc__,
        # the class list is known at build time only (the manual directory's classes.txt,
        # or the reference's): info.metadata["classes"] holds it
        features=av_media.clip_features(c, tfds.features.Scalar(dtype=np.int64)),
        homepage="https://arxiv.org/abs/1705.08168",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    check_manual_dir(manual_dir)
    classes = class_list(manual_dir)
    self.info.metadata["classes"] = list(classes)
    return {split: self._generate_examples(manual_dir, clips)
            for split, clips in split_lists(manual_dir, classes).items()}

  def _generate_examples(self, manual_dir: pathlib.Path, clips):
    c = self.builder_config
    decode = lambda clip: decode_clip(manual_dir, clip[0], c.frames, c.image_size)
    for (key, label), features in av_media.decoded_in_order(clips, decode):
      if isinstance(features, av_media.ClipError):
        print(f"Kinetics-Sounds: left out {key}: {features}")
        continue
      yield key, {**features, "label": label, "clip": key}
