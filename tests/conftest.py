"""Shared test settings: small shapes, CPU, deterministic seeds."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Run a test in float64 (for oracle comparisons near rounding level)."""
  with jax.enable_x64(True):
    yield
