"""Shared helper for the configs: the library's schema with defaults."""

from modalimmune_jax.config import base_config  # noqa: F401


def modalimmune_periods(config, hyper_every):
  """ModalImmune's periods for a run of ``config.train.steps`` steps: the
  controller and the curvature estimate every 10 steps, BHGD every
  ``hyper_every`` (about 12 hyper-steps per run at the defaults below)."""
  mi = config.method.modalimmune
  mi.ctrl_every = 10
  mi.mask_every = 10
  mi.hyper_every = hyper_every
  return config


def smoke(config):
  """A tiny variant for tests: few steps, small model, no checkpoints between;
  every periodic part of ModalImmune runs within its 12 steps."""
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
  mi = config.method.modalimmune
  mi.ctrl_every, mi.mask_every, mi.hyper_every = 2, 2, 4
  mi.hyper_terms, mi.hyper_batch_size = 4, 16
  return config


def pickle_config(name, variant=""):
  """CMU-MOSI / CMU-MOSEI / IEMOCAP from a MulT or MMSA pickle.

  The file comes from ``--config.data.path=FILE`` or the environment variable
  ``MODALIMMUNE_<NAME>`` (no data is downloaded at run time).
  """
  import os
  config = base_config()
  config.data.name = name
  config.data.path = os.environ.get(f"MODALIMMUNE_{name.upper()}", "")
  config.model.hidden = 64
  config.model.encoder_layers = 1
  config.train.steps = 3000
  config.train.batch_size = 32
  config.train.eval_every = 500
  config.checkpoint.every = 500
  config.eval.frame_rates = (0.1, 0.3, 0.5)
  # CMPT: LoRA on the attention projections, the paper's choice, which these data
  # sets' sequence encoders have (vector data keeps the default, every linear layer:
  # a vector encoder has no attention). Every method's values: METHODS.md.
  config.method.cmpt.lora_targets = "attention"
  modalimmune_periods(config, hyper_every=250)
  config.method.modalimmune.hyper_batch_size = 32
  if variant == "smoke":
    smoke(config)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'smoke'")
  return config
