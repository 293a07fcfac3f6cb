"""ModelNet40, two views of each object (MVCNN 12-view shaded renders)."""

from data_prep.modelnet40_views.modelnet40_views_dataset_builder import Builder, check_manual_dir
