"""Benchmarks: gml_jax's train step against a PyTorch reference (``make bench``)."""
