"""ModelNet40, two views of each object (MVCNN 12-view shaded renders)."""

from data_prep.modelnet40_views.modelnet40_views_dataset_builder import Builder, check_manual_dir

__all__ = ["Builder", "MODALITIES", "check_manual_dir"]

# The feature of each modality, in modality order (config.data.modalities indexes it).
MODALITIES = ("view_0", "view_1")  # two rendered views
