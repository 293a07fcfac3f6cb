"""Writes dummy_data/: a few tiny generated videos laid out like the real NVGesture tree.

Classes 1, 2 and 3; 4 training and 1 test recording each; 12-frame 40x30 MJPG clips whose
frame i has brightness 20 i (so tests can check which frames were sampled); annotated
gestures span frames [2, 10).

  python data_prep/nvgesture/make_dummy_data.py
"""

import pathlib

import cv2
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent / "dummy_data"
LISTS = {"train": "nvgesture_train_correct_cvpr2016_v2.lst",
         "test": "nvgesture_test_correct_cvpr2016_v2.lst"}


def write_video(path: pathlib.Path, offset: int) -> None:
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (40, 30))
  for i in range(12):
    frame = np.full((30, 40, 3), 20 * i, np.uint8)
    frame[:, :, 2] = np.clip(20 * i + offset, 0, 255)  # a per-class tint, in red (BGR)
    writer.write(frame)
  writer.release()


def main():
  lines = {"train": [], "test": []}
  for label in (1, 2, 3):
    for subject in range(5):
      split = "test" if subject == 4 else "train"
      folder = pathlib.Path("Video_data") / f"class_{label:02d}" / f"subject{subject}_r0"
      (ROOT / folder).mkdir(parents=True, exist_ok=True)
      write_video(ROOT / folder / "sk_color.avi", 10 * label)
      write_video(ROOT / folder / "sk_depth.avi", 0)
      lines[split].append(f"path:./{folder} depth:sk_depth:2:10 color:sk_color:2:10 "
                          f"duo_left:duo_left:3:11 label:{label}")
  for split, name in LISTS.items():
    (ROOT / name).write_text("\n".join(lines[split]) + "\n")


if __name__ == "__main__":
  main()
