"""Finding run directories (``train_and_evaluate`` work directories) for the scripts here."""

from __future__ import annotations

import os
from typing import Callable


def find_runs(paths, is_run: Callable[[str], bool]) -> list[str]:
  """The directories among ``paths`` and below them (``checkpoints/`` skipped)
  for which ``is_run(dir)`` holds, sorted, without repeats."""
  runs = []
  for path in paths:
    path = os.path.abspath(path)
    if not os.path.isdir(path):
      raise SystemExit(f"error: {path} is not a directory")
    for root, dirs, _ in os.walk(path):
      dirs[:] = sorted(d for d in dirs if d != "checkpoints")
      if is_run(root):
        runs.append(root)
  return sorted(dict.fromkeys(runs))


def parser(doc: str):
  """An argument parser with the scripts' common ``RUN_DIR ...`` and ``--out``."""
  import argparse
  p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                 help="run directories, or directories to search recursively")
  p.add_argument("--out", required=True, help="output directory")
  return p
