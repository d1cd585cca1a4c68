"""IEMOCAP from its MulT or MMSA pickle: --config.data.path=FILE (no download)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, smoke  # noqa: E402


def get_config(variant: str = ""):
  config = base_config()
  config.data.name = "iemocap"
  config.data.path = os.environ.get("MODALIMMUNE_IEMOCAP", "")
  config.model.hidden = 64
  config.model.encoder_layers = 1
  config.train.steps = 3000
  config.train.batch_size = 32
  config.train.eval_every = 500
  config.checkpoint.every = 500
  config.eval.frame_rates = (0.1, 0.3, 0.5)
  if variant == "smoke":
    smoke(config)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'smoke'")
  return config
