"""Shared helpers for the training tests."""

import importlib.util
import os

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(name="synthetic", variant="smoke"):
  path = os.path.join(ROOT, "experiments", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def restore_state(config, workdir):
  """The train state of the newest checkpoint in ``workdir`` (and its step)."""
  from modalimmune_jax import train
  from modalimmune_jax.checkpoint import Checkpointer
  run = train.setup(config, num_devices=1)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 2)
  try:
    step, state, _, _ = ckpt.restore_latest(run.state, jax.random.key(0))
  finally:
    ckpt.close()
  return step, state


def run_finite_steps(run, num_steps, each=None):
  """``num_steps`` steps of ``run.step_fn`` (keys ``fold_in(key(0), s)``), each
  with no skipped update and only finite metrics; ``each(s, metrics)`` adds a
  test's own checks. Returns the final state."""
  from modalimmune_jax.step import host_copy, shard_batch
  state = run.state
  for s in range(num_steps):
    state, metrics = run.step_fn(state, shard_batch(run.batches(s), run.mesh),
                                 jax.random.fold_in(jax.random.key(0), s))
    metrics = host_copy(metrics)
    assert metrics["nonfinite"] == 0.0, (s, metrics)
    assert all(np.all(np.isfinite(v)) for v in metrics.values()), (s, metrics)
    if each is not None:
      each(s, metrics)
  return state


def load_script(name):
  """``experiments/<name>.py`` as a module (its folder on ``sys.path``, as when
  it runs as a script), so a test can call its functions and ``main``."""
  import sys
  folder = os.path.join(ROOT, "experiments")
  if folder not in sys.path:
    sys.path.insert(0, folder)
  spec = importlib.util.spec_from_file_location(f"experiment_{name}",
                                                os.path.join(folder, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
