"""tensorflow-datasets builders of gml_jax's experiments (one sub-package each)."""
