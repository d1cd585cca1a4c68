"""Shared test settings: small shapes, CPU, deterministic seeds."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session and the subprocesses it
# starts: runs that compile the same program (resume tests, workers) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="modalimmune-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The programs under test are tiny: XLA's backend optimisations cost far more
# compile time than they save run time (ModalImmune's step: 26 s -> 16 s).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Run a test in float64 (for oracle comparisons near rounding level)."""
  with jax.enable_x64(True):
    yield
