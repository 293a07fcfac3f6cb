"""NVGesture (Molchanov et al., CVPR 2016) as two modalities: RGB (m_0) and depth (m_1)
clips of the annotated gesture, a fixed number of frames sampled uniformly from it.

Manual download only (the dataset's licence). The builder reads the official list files and
the ``sk_color.avi`` / ``sk_depth.avi`` clips they point to, decodes the annotated segment
with OpenCV, samples ``frames`` frames, and resizes them to ``size`` x ``size``.
Splits: the official ``test`` list; ``validation`` = 10% of the official training list
(fixed seed); ``train`` the rest. 25 classes.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import tensorflow_datasets as tfds

LISTS = {"train": "nvgesture_train_correct_cvpr2016_v2.lst",
         "test": "nvgesture_test_correct_cvpr2016_v2.lst"}
NUM_CLASSES = 25
VALIDATION_FRACTION = 0.1
_VALIDATION_SEED = 25
INSTRUCTIONS = (
    "NVGesture needs a manual download under its licence (NVIDIA, 'Dynamic Hand Gesture "
    "Recognition' dataset). The manual directory must hold the official list files "
    f"{LISTS['train']} and {LISTS['test']} and the tree they point to: "
    "Video_data/class_XX/subjectY_rZ/sk_color.avi and sk_depth.avi.")


@dataclasses.dataclass
class ClipConfig(tfds.core.BuilderConfig):
  frames: int = 32
  size: int = 112


@dataclasses.dataclass(frozen=True)
class Entry:
  """One line of a list file."""

  folder: str
  color: tuple[str, int, int]  # file stem, first frame, end frame (exclusive)
  depth: tuple[str, int, int]
  label: int  # 0-based


def parse_list(path: pathlib.Path) -> list[Entry]:
  """Parses ``path:... depth:sk_depth:s:e color:sk_color:s:e ... label:L`` lines."""
  entries = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    fields = dict(token.split(":", 1) for token in line.split() if ":" in token)
    try:
      clip = lambda key, fields=fields: (lambda s, a, b: (s, int(a), int(b)))(
          *fields[key].split(":"))
      label = int(fields["label"]) - 1
      entry = Entry(fields["path"], clip("color"), clip("depth"), label)
    except (KeyError, ValueError, TypeError) as e:
      raise ValueError(f"{path}:{number}: malformed line (expected 'path:... depth:sk_depth:"
                       f"<start>:<end> color:sk_color:<start>:<end> ... label:<1-25>'): "
                       f"{line!r}") from e
    if not 0 <= label < NUM_CLASSES:
      raise ValueError(f"{path}:{number}: label {label + 1} is not in 1..{NUM_CLASSES}.")
    entries.append(entry)
  return entries


def read_clip(path: pathlib.Path, start: int, end: int, frames: int, size: int) -> np.ndarray:
  """``frames`` frames sampled uniformly from [start, end) of a video, resized to size x
  size, RGB: uint8[frames, size, size, 3]."""
  import cv2

  if not path.is_file():
    raise FileNotFoundError(f"Missing video {path}. {INSTRUCTIONS}")
  capture = cv2.VideoCapture(str(path))
  decoded = []
  while True:
    ok, frame = capture.read()
    if not ok:
      break
    decoded.append(frame)
  capture.release()
  if not decoded or end > len(decoded) or not 0 <= start < end:
    raise ValueError(f"{path}: cannot take frames [{start}, {end}) of a video with "
                     f"{len(decoded)} decodable frames.")
  picks = np.linspace(start, end - 1, frames).round().astype(int)
  return np.stack([cv2.cvtColor(cv2.resize(decoded[i], (size, size),
                                           interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
                   for i in picks])


def check_manual_dir(directory) -> None:
  """Fails with the expected files unless ``directory`` holds the list files."""
  missing = [n for n in LISTS.values() if not (pathlib.Path(directory) / n).is_file()]
  if missing:
    raise FileNotFoundError(f"Missing {', '.join(missing)} in {directory}. {INSTRUCTIONS}")


class Builder(tfds.core.GeneratorBasedBuilder):
  """NVGesture, RGB and depth clips of the annotated gestures."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ClipConfig(name="frames32_112px", description="32 frames, 112x112", frames=32, size=112),
      ClipConfig(name="frames64_224px", description="64 frames, 224x224", frames=64, size=224),
      ClipConfig(name="frames8_32px", description="8 frames, 32x32 (smoke tests)", frames=8,
                 size=32),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    t, s = self.builder_config.frames, self.builder_config.size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "rgb": tfds.features.Tensor(shape=(t, s, s, 3), dtype=np.uint8),
            "depth": tfds.features.Tensor(shape=(t, s, s, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "video": tfds.features.Text(),
        }),
        homepage="https://research.nvidia.com/publication/2016-06_online-detection-and-"
                 "classification-dynamic-hand-gestures-recurrent-3d",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = pathlib.Path(dl_manager.manual_dir)
    check_manual_dir(root)
    train, test = parse_list(root / LISTS["train"]), parse_list(root / LISTS["test"])
    order = np.random.default_rng(_VALIDATION_SEED).permutation(len(train))
    n_val = int(round(len(train) * VALIDATION_FRACTION))
    validation = [train[i] for i in sorted(order[:n_val])]
    train = [train[i] for i in sorted(order[n_val:])]
    return {"train": self._generate_examples(root, train),
            "validation": self._generate_examples(root, validation),
            "test": self._generate_examples(root, test)}

  def _generate_examples(self, root: pathlib.Path, entries):
    t, s = self.builder_config.frames, self.builder_config.size
    for entry in entries:
      folder = root / entry.folder
      stem, start, end = entry.color
      rgb = read_clip(folder / f"{stem}.avi", start, end, t, s)
      stem, start, end = entry.depth
      depth = read_clip(folder / f"{stem}.avi", start, end, t, s)[..., :1]
      yield entry.folder, {"rgb": rgb, "depth": depth, "label": entry.label,
                           "video": entry.folder}
