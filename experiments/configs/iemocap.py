"""IEMOCAP from its MulT or MMSA pickle: --config.data.path=FILE (no download)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import pickle_config  # noqa: E402


def get_config(variant: str = ""):
  return pickle_config("iemocap", variant)
