"""Backbones, one module each: ``stages(**options)`` returns a branch's stages (modules
called as ``stage(x, train=...)``) and ``FUSION_AFTER`` the stages followed by an MMTM.

Adding a backbone is adding a file here; :func:`gml_jax.models.build` finds it by name.
"""
