"""CREMA-D (Cao et al. 2014): audio and video of actors speaking with six emotions."""

from data_prep.cremad.cremad_dataset_builder import Builder, check_manual_dir

__all__ = ["Builder", "MODALITIES", "check_manual_dir"]

# The feature of each modality, in modality order (config.data.modalities indexes it).
MODALITIES = ("audio", "visual")  # log spectrogram, frames at 1 fps
