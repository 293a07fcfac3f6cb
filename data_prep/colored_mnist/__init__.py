"""Colored-and-gray MNIST: two modalities of each digit, with a spurious color cue."""

from data_prep.colored_mnist.colored_mnist_dataset_builder import Builder
from data_prep.colored_mnist.mnist_sources import check_manual_dir

__all__ = ["Builder", "MODALITIES", "check_manual_dir"]

# The feature of each modality, in modality order (config.data.modalities indexes it).
MODALITIES = ("gray", "colored")  # gray digit, colored digit
