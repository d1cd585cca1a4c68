"""UCI Multiple Features: 6 views, 10 digit classes, offline (the README's main job)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, modalimmune_periods, smoke  # noqa: E402


def get_config(variant: str = ""):
  config = base_config()
  config.data.name = "mfeat"
  config.model.hidden = 64
  config.optim.learning_rate = 2e-3
  config.train.steps = 600
  config.train.batch_size = 64
  modalimmune_periods(config, hyper_every=50)  # --config.method.name=modalimmune
  config.train.eval_every = 200
  config.checkpoint.every = 200
  config.eval.missing_rates = (0.3, 0.5, 0.7)
  config.eval.snrs_db = (10.0, 0.0)
  config.eval.removals = "drop_one+keep_one"  # 12 of the 62 subsets of 6 views
  if variant == "smoke":
    smoke(config)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'smoke'")
  return config
