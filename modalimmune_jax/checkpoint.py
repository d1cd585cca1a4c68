"""Orbax checkpoints of the whole :class:`~modalimmune_jax.step.TrainState`.

One ``StandardSave`` tree holds the train state (step, params, optimiser state,
method state, health counters) and the base PRNG key; a JSON item beside it
holds the loop's bookkeeping (data position, seconds). Typed PRNG keys anywhere
in the state are stored as their key data and re-wrapped on restore.

Nothing is ever deleted except by orbax's ``max_to_keep``: a checkpoint that
does not restore, and a partial one left by a process killed while writing
(orbax's ``*.orbax-checkpoint-tmp*`` folders), are *moved aside* into
``<directory>.aside/`` with a warning, and the newest good one is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)

_TMP_MARK = ".orbax-checkpoint-tmp"


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree, template):
  return jax.tree.map(lambda x, t: jax.random.wrap_key_data(x) if _is_key(t) else x,
                      tree, template)


class Checkpointer:
  """Orbax ``CheckpointManager`` for the train state and the base PRNG key,
  with JSON metadata (step, data position ``(epoch, batch)``, counters).

  :meth:`restore_latest` walks back from the newest step until one restores;
  each one that does not is moved aside (``<directory>.aside/``), so the
  steps since the good one are retrained and saved again as if nothing had
  happened, any number of times.

  Example:
    >>> ckpt = Checkpointer("runs/x/checkpoints", max_to_keep=2)
    >>> ckpt.save(100, state, rng, {"step": 100})
    >>> step, state, rng, meta = ckpt.restore_latest(state, rng)
  """

  def __init__(self, directory: str, max_to_keep: int):
    self.directory = os.path.abspath(directory)
    self.aside_directory = self.directory + ".aside"
    if os.path.isdir(self.directory):
      for name in sorted(os.listdir(self.directory)):
        if _TMP_MARK in name:  # a write that never finished
          self._move_aside(name, "partial checkpoint (the writer was stopped)")
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))

  def _move_aside(self, name: str, why: str) -> str:
    os.makedirs(self.aside_directory, exist_ok=True)
    target = os.path.join(self.aside_directory, f"{name}.{time.strftime('%Y%m%d-%H%M%S')}")
    while os.path.exists(target):
      target += "+"
    shutil.move(os.path.join(self.directory, name), target)
    log.warning("%s/%s: %s; moved aside to %s", self.directory, name, why, target)
    return target

  def save(self, step: int, state, rng, meta: dict) -> None:
    tree = {"state": _keys_to_data(state), "rng": jax.random.key_data(rng)}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)

  def restore_latest(self, state, rng, at_most: int | None = None):
    """``(step, state, rng, meta)`` of the newest good checkpoint, or None.

    ``state`` and ``rng`` are templates (structure, shapes, dtypes, shardings).
    Checkpoints newer than the one returned did not restore and were moved
    aside; so are those after ``at_most`` (seeds trained in one program resume
    from the newest step they all have, and retrain the rest identically).
    """
    template = {"state": _keys_to_data(state), "rng": jax.random.key_data(rng)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    moved = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      if at_most is not None and step > at_most:
        self._move_aside(str(step), f"newer than step {at_most}, where the seeds trained "
                         "with it resume")
        self.manager.reload()
        continue
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any failure means: try an older one
        reason = f"does not restore ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        moved.append(self._move_aside(str(step), reason))
        self.manager.reload()
        continue
      tree = restored.state
      return (step, _data_to_keys(tree["state"], state), jax.random.wrap_key_data(tree["rng"]),
              dict(restored.meta))
    if moved:
      log.warning("%s: no checkpoint restores (all moved aside to %s); starting afresh",
                  self.directory, self.aside_directory)
    return None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
