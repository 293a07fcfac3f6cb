"""UCI Multiple Features (mfeat): six real views of 2,000 handwritten digits."""

from data_prep.mfeat.mfeat_dataset_builder import VIEWS, Builder, check_manual_dir

__all__ = ["Builder", "MODALITIES", "check_manual_dir"]

# The feature of each modality, in modality order (config.data.modalities indexes it).
MODALITIES = tuple(VIEWS)  # fac, fou, kar, mor, pix, zer
