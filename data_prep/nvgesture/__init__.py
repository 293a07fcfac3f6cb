"""NVIDIA Dynamic Hand Gesture (NVGesture): RGB and depth video of 25 gestures."""

from data_prep.nvgesture.nvgesture_dataset_builder import Builder, check_manual_dir
