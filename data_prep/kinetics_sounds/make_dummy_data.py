"""Writes dummy_data/: a few tiny clips in each layout the Kinetics-Sounds builder reads.

* ``clips/``: ``train/<class>/<id>.mp4`` and ``test/<class>/<id>.mp4`` (MPEG-4 video 32x24
  at 10 fps for 5 s, frame i a flat gray of 20 + 4 i; AAC audio, a 1-s tone in STFT bin
  20 + 12 x label at 22,050 Hz) and ``classes.txt`` (three class names);
* ``extracted/``: the reference's layout, ``audio/<id>.wav`` (the same tones, 16 kHz PCM)
  and ``frames/<id>/frame_00001.jpg`` ... ``frame_00010.jpg`` (16x16, gray 20 + 20 k), with
  ``my_train.txt`` / ``my_test.txt`` labelling them with the reference's label numbers.

  python data_prep/kinetics_sounds/make_dummy_data.py
"""

import pathlib
import wave

import av
import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent / "dummy_data"
CLASSES = ("playing bagpipes", "playing drums", "ripping paper")
CLIPS = {"train": {"playing bagpipes": ("a0", "a1"), "playing drums": ("b0", "b1"),
                   "ripping paper": ("c0", "c1")},
         "test": {"playing bagpipes": ("a2",), "ripping paper": ("c2",)}}
EXTRACTED = {"train": (("x0_000010_000020", 4), ("x1_000000_000010", 17),
                       ("x2_000030_000040", 30), ("x3_000005_000015", 4)),
             "test": (("y0_1", 17), ("y1_2", 30))}
FPS, FRAMES, WIDTH, HEIGHT = 10, 50, 32, 24


def peak_bin(label: int) -> int:
  return 20 + 12 * (label % 8)


def tone(label: int, rate: int, seconds: float) -> np.ndarray:
  t = np.arange(int(rate * seconds)) / rate
  return (0.5 * np.sin(2 * np.pi * peak_bin(label) * 22_050 / 512 * t)).astype(np.float32)


def write_mp4(path: pathlib.Path, label: int, rate: int = 16_000):
  with av.open(str(path), "w", format="mp4") as container:
    video = container.add_stream("mpeg4", rate=FPS)
    video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    video.options = {"qscale": "1"}
    audio = container.add_stream("aac", rate=rate)
    audio.layout, audio.bit_rate = "mono", 32_000
    for i in range(FRAMES):
      pixels = np.full((HEIGHT, WIDTH, 3), 20 + 4 * i, np.uint8)
      container.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
    container.mux(video.encode())
    samples = tone(label, rate, 1.0)
    for start in range(0, len(samples), 1024):
      frame = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="fltp",
                                         layout="mono")
      frame.sample_rate, frame.pts = rate, start
      container.mux(audio.encode(frame))
    container.mux(audio.encode())


def write_wav(path: pathlib.Path, label: int, rate: int = 16_000):
  with wave.open(str(path), "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes((tone(label, rate, 0.6) * 32767).astype("<i2").tobytes())


def main():
  clips = ROOT / "clips"
  for split, classes in CLIPS.items():
    for cls, ids in classes.items():
      (clips / split / cls).mkdir(parents=True, exist_ok=True)
      for clip in ids:
        write_mp4(clips / split / cls / f"{clip}.mp4", CLASSES.index(cls))
  (clips / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
  extracted = ROOT / "extracted"
  (extracted / "audio").mkdir(parents=True, exist_ok=True)
  for split, items in EXTRACTED.items():
    for clip, label in items:
      write_wav(extracted / "audio" / f"{clip}.wav", label)
      (extracted / "frames" / clip).mkdir(parents=True, exist_ok=True)
      for k in range(10):
        Image.fromarray(np.full((16, 16, 3), 20 + 20 * k, np.uint8)).save(
            extracted / "frames" / clip / f"frame_{k + 1:05d}.jpg", quality=95)
    (extracted / f"my_{split}.txt").write_text("".join(f"{c},10,{lab}\n" for c, lab in items))


if __name__ == "__main__":
  main()
