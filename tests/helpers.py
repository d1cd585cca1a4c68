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
