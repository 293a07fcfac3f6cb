"""Colored-and-gray MNIST: two modalities of each digit, with a spurious color cue."""

from data_prep.colored_mnist.colored_mnist_dataset_builder import Builder
from data_prep.colored_mnist.mnist_sources import check_manual_dir
