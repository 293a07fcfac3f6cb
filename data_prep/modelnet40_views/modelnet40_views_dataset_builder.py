"""ModelNet40 as two modalities: two of the 12 MVCNN shaded views of each object.

The renders are those of MVCNN (Su et al., ICCV 2015), ``modelnet40_images_new_12x``: one
folder per class, ``train/`` and ``test/`` under it, and 12 PNG views per object named
``<object>.obj.shaded_v001.png`` ... ``_v012.png``. Two views (builder config; default view 0
and view 6, opposite sides) become the modalities ``view_0`` (m_0) and ``view_1`` (m_1).
Splits: the official ``test``; ``validation`` = 20% of the training objects (fixed seed);
``train`` the rest. Images are stored as RGB PNG at their own size.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import tarfile
import zipfile

import numpy as np
import tensorflow_datasets as tfds

ROOT_NAME = "modelnet40_images_new_12x"
ARCHIVES = ("modelnet40_images_new_12x.tar", "modelnet40_images_new_12x.tar.gz",
            "modelnet40_images_new_12x.zip", "shaded_images.tar.gz")
CLASSES = (
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair",
    "cone", "cup", "curtain", "desk", "door", "dresser", "flower_pot", "glass_box", "guitar",
    "keyboard", "lamp", "laptop", "mantel", "monitor", "night_stand", "person", "piano",
    "plant", "radio", "range_hood", "sink", "sofa", "stairs", "stool", "table", "tent",
    "toilet", "tv_stand", "vase", "wardrobe", "xbox")
VALIDATION_FRACTION = 0.2
_VALIDATION_SEED = 40
INSTRUCTIONS = (
    f"Put the MVCNN 12-view shaded renders of ModelNet40 in the manual directory: either the "
    f"folder {ROOT_NAME}/ (<class>/train|test/<object>.obj.shaded_v001.png ... _v012.png, "
    f"for the 40 classes) or one of the archives {', '.join(ARCHIVES)} that holds it. The "
    "renders are distributed with the MVCNN code (Su et al. 2015; e.g. the 'shaded images' "
    "archive of the mvcnn_pytorch project).")


@dataclasses.dataclass
class ViewsConfig(tfds.core.BuilderConfig):
  """``views``: the two of the 12 renders; ``image_size``: > 0 stores them decoded and
  resized to that square size (uint8 tensors: no per-epoch decoding or resizing, about
  7x the disk of the PNGs), 0 as the PNGs they are."""

  views: tuple[int, int] = (0, 6)
  image_size: int = 0


def view_file(obj: str, view: int) -> str:
  return f"{obj}.obj.shaded_v{view + 1:03d}.png"


class _Tree:
  """Read access to the renders in a folder or an archive, by path relative to the root."""

  def __init__(self, manual_dir: pathlib.Path):
    manual_dir = pathlib.Path(manual_dir)
    self.folder, self.archive = None, None
    for candidate in (manual_dir / ROOT_NAME, manual_dir):
      if (candidate / CLASSES[0]).is_dir() or any(
          (candidate / c).is_dir() for c in CLASSES):
        self.folder = candidate
        break
    if self.folder is None:
      found = [manual_dir / a for a in ARCHIVES if (manual_dir / a).is_file()]
      if not found:
        raise FileNotFoundError(f"No ModelNet40 renders in {manual_dir}. {INSTRUCTIONS}")
      self.archive = found[0]
      self._handle, self._members = self._index(found[0])

  @staticmethod
  def _index(path: pathlib.Path):
    """The open archive, and its members by their path below the root folder."""
    if path.suffix == ".zip":
      handle = zipfile.ZipFile(path)
      names = {n: n for n in handle.namelist()}
    else:
      handle = tarfile.open(path)
      names = {m.name: m for m in handle.getmembers() if m.isfile()}
    out = {}
    for name, member in names.items():
      parts = pathlib.PurePosixPath(name).parts
      if ROOT_NAME in parts:
        parts = parts[parts.index(ROOT_NAME) + 1:]
      out["/".join(parts)] = member
    return handle, out

  def objects(self, cls: str, split: str) -> list[str]:
    """Object names (without view suffix) of a class and split, sorted."""
    suffix = ".obj.shaded_v001.png"
    if self.folder is not None:
      files = (self.folder / cls / split).glob(f"*{suffix}")
      return sorted(f.name[: -len(suffix)] for f in files)
    prefix = f"{cls}/{split}/"
    return sorted(n[len(prefix): -len(suffix)] for n in self._members
                  if n.startswith(prefix) and n.endswith(suffix))

  def read(self, cls: str, split: str, name: str) -> bytes:
    rel = f"{cls}/{split}/{name}"
    if self.folder is not None:
      path = self.folder / rel
      if not path.is_file():
        raise FileNotFoundError(f"Missing view {path}. {INSTRUCTIONS}")
      return path.read_bytes()
    if rel not in self._members:
      raise FileNotFoundError(f"Missing view {rel} in {self.archive}. {INSTRUCTIONS}")
    member = self._members[rel]
    if isinstance(self._handle, zipfile.ZipFile):
      return self._handle.read(member)
    return self._handle.extractfile(member).read()


def check_manual_dir(directory) -> None:
  """Fails with the expected layout unless ``directory`` holds the renders."""
  if not pathlib.Path(directory).is_dir():
    raise FileNotFoundError(f"Manual directory {directory} does not exist. {INSTRUCTIONS}")
  _Tree(pathlib.Path(directory))


def _rgb_png(data: bytes, where: str) -> bytes:
  from PIL import Image

  try:
    image = Image.open(io.BytesIO(data)).convert("RGB")
  except Exception as e:  # PIL raises several kinds for broken files
    raise ValueError(f"{where} is not a readable PNG: {e}") from e
  out = io.BytesIO()
  image.save(out, format="PNG")
  return out.getvalue()


def _decoded(png: bytes, size: int) -> np.ndarray:
  """The render as uint8[size, size, 3], resized as the input pipeline would (bilinear)."""
  from PIL import Image

  image = Image.open(io.BytesIO(png)).convert("RGB")
  return np.asarray(image.resize((size, size), Image.BILINEAR))


class Builder(tfds.core.GeneratorBasedBuilder):
  """ModelNet40, two of the 12 MVCNN views."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ViewsConfig(name=f"views_{a}_{b}", description=f"views {a} and {b} of 12", views=(a, b))
      for a, b in ((0, 6), (0, 3), (0, 1))
  ] + [ViewsConfig(name="views_0_6_224px", views=(0, 6), image_size=224,
                   description="views 0 and 6, decoded and resized to 224x224 at build time")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    view = lambda: (tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8) if size else
                    tfds.features.Image(shape=(None, None, 3), encoding_format="png"))
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "view_0": view(),
            "view_1": view(),
            "label": tfds.features.ClassLabel(names=CLASSES),
            "object": tfds.features.Text(),
        }),
        homepage="https://modelnet.cs.princeton.edu/",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    tree = _Tree(dl_manager.manual_dir)
    train, test = [], []
    for cls in CLASSES:
      train += [(cls, "train", o) for o in tree.objects(cls, "train")]
      test += [(cls, "test", o) for o in tree.objects(cls, "test")]
    if not train or not test:
      raise FileNotFoundError(f"No training or test objects found. {INSTRUCTIONS}")
    order = np.random.default_rng(_VALIDATION_SEED).permutation(len(train))
    n_val = int(round(len(train) * VALIDATION_FRACTION))
    validation = [train[i] for i in sorted(order[:n_val])]
    train = [train[i] for i in sorted(order[n_val:])]
    return {
        "train": self._generate_examples(tree, train),
        "validation": self._generate_examples(tree, validation),
        "test": self._generate_examples(tree, test),
    }

  def _generate_examples(self, tree: _Tree, objects):
    for cls, split, obj in objects:
      example = {"label": cls, "object": obj}
      for m, view in enumerate(self.builder_config.views):
        name = view_file(obj, view)
        png = _rgb_png(tree.read(cls, split, name), f"{cls}/{split}/{name}")
        size = self.builder_config.image_size
        example[f"view_{m}"] = _decoded(png, size) if size else png
      yield f"{split}/{obj}", example
