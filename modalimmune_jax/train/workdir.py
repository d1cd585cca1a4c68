"""The work directory and the process around a run: its config check, the
errors a run stops with, and SIGTERM / SIGINT turned into a checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time

import ml_collections

from modalimmune_jax import config as config_lib

__all__ = ["NonFiniteError", "WorkdirError", "Interrupted", "check_workdir", "StopSignals"]

log = logging.getLogger("modalimmune_jax.train")


class NonFiniteError(FloatingPointError):
  """Training met non-finite values too many steps in a row (or was told to stop
  at the first); the message names the step and the terms."""


class WorkdirError(ValueError):
  """The work directory holds a run that another config made."""


class Interrupted(KeyboardInterrupt):
  """SIGTERM or SIGINT: a checkpoint was saved and the run stopped."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


def check_workdir(config: ml_collections.ConfigDict, workdir: str,
                  on_change: str = "refuse") -> str | None:
  """Compares ``config`` with the one ``workdir`` was made with (``config.json``).

  ``on_change``: ``"refuse"`` raises :class:`WorkdirError` naming the keys
  that change what is trained (model, data, method, optimiser, seed, steps;
  see :data:`~modalimmune_jax.config.RUN_INDEPENDENT` for those that may
  change); ``"fresh"`` moves the old directory aside (``WORKDIR.old-TIME``)
  and starts again; ``"extend"`` accepts a larger ``train.steps`` (and
  nothing else) and trains the run on. Returns what happened: None (new or
  same), ``"moved"`` or ``"extended"``. Touches nothing unless ``fresh``.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path}: unreadable ({e}); use --fresh to move the run aside") from e
  diff = config_lib.trained_differences(old, config)
  if not diff:
    return None
  listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diff)
  if on_change == "fresh":
    target = f"{workdir.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(workdir, target)
    log.warning("%s was made with another config (%s); moved it to %s", workdir, listed, target)
    return "moved"
  if on_change == "extend":
    if [k for k, _, _ in diff] == ["train.steps"] and diff[0][2] > diff[0][1]:
      return "extended"
    raise WorkdirError(f"{workdir}: --extend trains a run on to a larger train.steps and "
                       f"changes nothing else; this config changes {listed}")
  raise WorkdirError(f"{workdir} was made with another config: {listed}. Use --fresh to move "
                     "it aside and start again, --extend to train on to more steps, or "
                     "another --workdir")


class StopSignals:
  """Turns SIGTERM / SIGINT into a flag the loop polls (main thread only);
  a second signal gets the default behaviour."""

  def __init__(self):
    self.received = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signum
    self._restore()

  def _restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    self._old = {}

  def __exit__(self, *exc):
    self._restore()
    return False
