"""Shared test settings: small shapes, CPU, deterministic seeds."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session, its xdist workers and the
# subprocesses it starts (they inherit the variable): runs that compile the same
# program (resume tests, workers) compile once. Made by the process that finds
# no cache set (pytest itself, or xdist's controller), removed when it ends.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="modalimmune-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
# Every program, however quick to compile: the many small ones (parameter
# initialisers, evaluation, the CLI subprocesses' whole start) add up
# (test_reliability + test_model: 120 s -> 96 s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The programs under test are tiny and run a few steps: XLA's CPU optimisations
# cost far more compile time than they save run time (ModalImmune's step,
# curvature refresh and hyper-step compile 2.5-4x faster; the flags and figures:
# provenance.QUICK_COMPILE_XLA_FLAGS). A user's run keeps XLA's defaults.
from modalimmune_jax.provenance import quick_compile_xla_flags  # noqa: E402  (starts no backend)

os.environ["XLA_FLAGS"] = quick_compile_xla_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def x64():
  """Run a test in float64 (for oracle comparisons near rounding level)."""
  with jax.enable_x64(True):
    yield


def _shared_fixture_module(item):
  """The test module whose module-scoped fixture ``item`` uses (None if none)."""
  info = getattr(item, "_fixtureinfo", None)
  for defs in (info.name2fixturedefs.values() if info is not None else ()):
    if defs and defs[-1].scope in ("module", "package", "session") and defs[-1].baseid:
      return item.module.__name__  # a fixture of the project's tests, not a plugin's
  return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Scheduling only (no test changes): the tests that share one of their
  module's module-scoped fixtures (a trained reference run, say) form one
  ``xdist_group``, so ``--dist loadgroup`` (setup.cfg) builds it in one worker
  only; and the tests marked ``slow`` start first, so the two workers do not
  end with one long test left on one of them."""
  if config.pluginmanager.hasplugin("xdist"):
    for item in items:
      module = _shared_fixture_module(item)
      if module is not None:
        item.add_marker(pytest.mark.xdist_group(module))
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable
