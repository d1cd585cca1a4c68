"""Shared helper for the configs: the library's schema with defaults."""

from modalimmune_jax.config import base_config  # noqa: F401


def smoke(config):
  """A tiny variant for tests: few steps, small model, no checkpoints between."""
  config.train.steps = 12
  config.train.batch_size = 16
  config.train.log_every = 4
  config.train.eval_every = 0
  config.checkpoint.every = 6
  config.model.hidden = 16
  config.model.num_heads = 2
  config.eval.batch_size = 64
  config.eval.missing_rates = (0.5,)
  config.eval.snrs_db = (0.0,)
  return config
