"""NVIDIA Dynamic Hand Gesture (NVGesture): RGB and depth video of 25 gestures."""

from data_prep.nvgesture.nvgesture_dataset_builder import Builder, check_manual_dir

__all__ = ["Builder", "MODALITIES", "check_manual_dir"]

# The feature of each modality, in modality order (config.data.modalities indexes it).
MODALITIES = ("rgb", "depth")  # RGB video, depth video
