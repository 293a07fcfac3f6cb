"""Kinetics-Sounds: audio and video of the Kinetics classes that can be heard."""

from data_prep.kinetics_sounds.kinetics_sounds_dataset_builder import Builder, check_manual_dir

__all__ = ["Builder", "MODALITIES", "check_manual_dir"]

# The feature of each modality, in modality order (config.data.modalities indexes it).
MODALITIES = ("audio", "visual")  # log spectrogram, frames at 1 fps
