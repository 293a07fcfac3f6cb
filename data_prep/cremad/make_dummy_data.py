"""Writes dummy_data/: ten tiny clips in the layout of the CREMA-D release, and the lists.

Each clip ``<actor>_<sentence>_<EMO>_<level>`` has
* ``AudioWAV/<name>.wav``: 0.6 s of 16 kHz mono 16-bit PCM, a sine whose frequency is the
  centre of STFT bin 20 + 12 x label at 22,050 Hz (label in the reference's order), so a
  test can read the label back from the spectrogram's peak;
* ``VideoFlash/<name>.flv``: 2.5 s of 32x24 video at 10 fps (FLV1 codec), frame i a flat
  gray of value 20 + 8 i, so a test can tell which frames were taken.
``train.csv`` lists eight clips (every emotion), ``test.csv`` two, one ``<name>,<EMO>`` a line.

  python data_prep/cremad/make_dummy_data.py
"""

import pathlib
import wave

import av
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent / "dummy_data"
EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")  # the reference's label order
TRAIN = ("1001_DFA_NEU_XX", "1001_IEO_HAP_LO", "1002_DFA_SAD_XX", "1002_ITS_FEA_HI",
         "1003_TIE_DIS_XX", "1003_WSI_ANG_MD", "1004_IWW_HAP_XX", "1004_MTI_ANG_XX")
TEST = ("1005_DFA_SAD_XX", "1005_IOM_NEU_XX")
FPS, FRAMES, WIDTH, HEIGHT = 10, 25, 32, 24


def peak_bin(label: int) -> int:
  return 20 + 12 * label


def write_wav(path: pathlib.Path, label: int, rate: int = 16_000, seconds: float = 0.6):
  t = np.arange(int(rate * seconds)) / rate
  tone = 0.5 * np.sin(2 * np.pi * peak_bin(label) * 22_050 / 512 * t)
  with wave.open(str(path), "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes((tone * 32767).astype("<i2").tobytes())


def write_flv(path: pathlib.Path):
  with av.open(str(path), "w", format="flv") as container:
    stream = container.add_stream("flv", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    stream.options = {"qscale": "1"}
    for i in range(FRAMES):
      pixels = np.full((HEIGHT, WIDTH, 3), 20 + 8 * i, np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def main():
  for folder in ("AudioWAV", "VideoFlash"):
    (ROOT / folder).mkdir(parents=True, exist_ok=True)
  for name in TRAIN + TEST:
    write_wav(ROOT / "AudioWAV" / f"{name}.wav", EMOTIONS.index(name.split("_")[2]))
    write_flv(ROOT / "VideoFlash" / f"{name}.flv")
  for split, names in (("train", TRAIN), ("test", TEST)):
    (ROOT / f"{split}.csv").write_text("".join(f"{n},{n.split('_')[2]}\n" for n in names))


if __name__ == "__main__":
  main()
