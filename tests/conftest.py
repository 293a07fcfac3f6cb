"""Test setup: 8 simulated CPU devices (set before JAX starts), float32 matmuls."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the flags)

jax.config.update("jax_default_matmul_precision", "highest")
