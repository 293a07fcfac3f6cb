"""Audio and frames of a clip as the field's reference code prepares them (OGM-GE, Peng et
al. CVPR 2022: ``dataset/CramedDataset.py`` and its frame extraction), decoded here with
PyAV (FFmpeg in its wheels), shared by the CREMA-D and Kinetics-Sounds builders.

* :func:`spectrogram`: the audio at 22,050 Hz, mono, tiled to exactly 3 s, clipped to
  [-1, 1], STFT (n_fft 512, hop 353, periodic Hann window, centred with reflected edges),
  log(|S| + 1e-7): float32[257, 188].
* :func:`clip_frames`: the frames at 1 fps, frame k taken in the middle of second k (the
  reference's ``round((k + 1/2) fps)``-th frame; past the clip's end, frames of its last
  second again, in turn), converted to RGB and resized (PIL bilinear) to a square.

PyAV is an ``experiments`` extra, imported only when a clip is decoded.
"""

from __future__ import annotations

import collections
import math
import pathlib

import numpy as np

SAMPLE_RATE = 22_050
SECONDS = 3
N_FFT, HOP = 512, 353
SPECTROGRAM_SHAPE = (N_FFT // 2 + 1, 1 + SAMPLE_RATE * SECONDS // HOP)  # (257, 188)


class ClipError(ValueError):
  """A clip that is missing or cannot be decoded (the message names it)."""


def _av():
  try:
    import av
  except ImportError as e:  # the runner's extra, not the library's
    raise ImportError("Decoding clips needs PyAV: pip install -e '.[experiments]' "
                      "(or pip install av).") from e
  return av


def clip_features(config, label):
  """The features of a clip of the audio-visual builders: the spectrogram, ``config``'s
  frames (``frames`` x ``image_size``), the ``label`` feature and the clip's name."""
  import tensorflow_datasets as tfds

  size = config.image_size
  return tfds.features.FeaturesDict({
      "audio": tfds.features.Tensor(shape=(*SPECTROGRAM_SHAPE, 1), dtype=np.float32),
      "visual": tfds.features.Tensor(shape=(config.frames, size, size, 3), dtype=np.uint8),
      "label": label,
      "clip": tfds.features.Text(),
  })


def load_audio(path) -> np.ndarray:
  """The first audio stream of a file (wav, flv, mp4, ...) as float32 mono samples at
  22,050 Hz (FFmpeg's resampler; channels averaged)."""
  av = _av()
  path = pathlib.Path(path)
  if not path.is_file():
    raise ClipError(f"{path} is missing")
  try:
    with av.open(str(path)) as container:
      if not container.streams.audio:
        raise ClipError(f"{path} has no audio stream")
      resampler = av.AudioResampler(format="fltp", layout="mono", rate=SAMPLE_RATE)
      chunks = []
      for frame in container.decode(container.streams.audio[0]):
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
      chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
  except av.FFmpegError as e:
    raise ClipError(f"{path} is not readable audio ({e})") from e
  samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
  if samples.size == 0:
    raise ClipError(f"{path} holds no audio samples")
  return samples


def hann(n: int) -> np.ndarray:
  """The periodic Hann window (as scipy's ``get_window('hann', n)``)."""
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float64)


def spectrogram(samples: np.ndarray) -> np.ndarray:
  """log(|STFT| + 1e-7) of ``samples`` (22,050 Hz) tiled to exactly 3 s and clipped to
  [-1, 1]: float32[257, 188]. Frames are centred (n_fft / 2 reflected samples each side)."""
  samples = np.asarray(samples, np.float64).reshape(-1)
  if samples.size == 0:
    raise ValueError("spectrogram: no samples.")
  n = SAMPLE_RATE * SECONDS
  x = np.clip(np.resize(samples, n), -1.0, 1.0)  # np.resize repeats the clip to n samples
  x = np.pad(x, N_FFT // 2, mode="reflect")
  frames = 1 + (len(x) - N_FFT) // HOP
  index = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
  spectrum = np.fft.rfft(x[index] * hann(N_FFT)[None, :], axis=1).T
  return np.log(np.abs(spectrum) + 1e-7).astype(np.float32)


def frame_indices(seconds, fps: float, total: int) -> list[int]:
  """0-based indices of the frames at 1 fps of the given ``seconds``: for second k the
  ``round((k + 1/2) fps)``-th frame (1-based); one past the clip's ``total`` frames, the
  frames of its last second again, in turn (as the reference's extraction)."""
  if total < 1:
    raise ValueError("frame_indices: the clip has no frames.")
  per_second = max(1, round(fps))
  last = total % per_second or per_second
  last_start = total - min(last, total)
  out = []
  for k in seconds:
    i = max(round((k + 0.5) * fps) - 1, 0)
    if i >= total:
      i = last_start + (i - last_start) % (total - last_start)
    out.append(i)
  return out


def clip_frames(path, seconds, size: int) -> np.ndarray:
  """The frames at 1 fps of the given ``seconds`` (:func:`frame_indices`) of a video file,
  RGB, resized to ``size`` x ``size`` (PIL bilinear): uint8[len(seconds), size, size, 3]."""
  av = _av()
  from PIL import Image

  path = pathlib.Path(path)
  if not path.is_file():
    raise ClipError(f"{path} is missing")
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise ClipError(f"{path} has no video stream")
      stream = container.streams.video[0]
      fps = float(stream.average_rate or stream.guessed_rate or 0)
      if not fps > 0:
        raise ClipError(f"{path} has no frame rate")
      wanted = set(frame_indices(seconds, fps, 1 << 30))  # before the length is known
      kept, tail, total = {}, collections.deque(maxlen=math.ceil(fps) + 1), 0
      for frame in container.decode(stream):
        if total in wanted:
          kept[total] = frame.to_image()
        tail.append((total, frame))
        total += 1
  except av.FFmpegError as e:
    raise ClipError(f"{path} is not readable video ({e})") from e
  if total == 0:
    raise ClipError(f"{path} holds no video frames")
  tail = dict(tail)
  images = []
  for i in frame_indices(seconds, fps, total):
    image = kept.get(i) or tail[i].to_image()
    images.append(np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR)))
  return np.stack(images)


def image_frames(paths, size: int) -> np.ndarray:
  """Frames already extracted (JPEG/PNG files) as uint8[len(paths), size, size, 3]."""
  from PIL import Image

  images = []
  for p in paths:
    try:
      with Image.open(p) as image:
        images.append(np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR)))
    except (OSError, ValueError) as e:
      raise ClipError(f"{p} is not a readable image ({e})") from e
  return np.stack(images)


def decoded_in_order(items, decode, threads: int = 0):
  """``(item, decode(item))`` for every item, in order, decoded by ``threads`` threads (0:
  one per core; FFmpeg decodes outside the GIL); a ``ClipError`` stands in for the
  result of a clip that cannot be decoded."""
  import concurrent.futures
  import os

  def safe(item):
    try:
      return decode(item)
    except ClipError as e:
      return e

  with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
    yield from zip(items, pool.map(safe, items))
