"""Orbax checkpoints of the whole :class:`~modalimmune_jax.step.TrainState`.

One ``StandardSave`` tree holds the train state (step, params, optimiser state,
method state) and the base PRNG key; a JSON item beside it holds the loop's
bookkeeping (data position, counters, seconds). Typed PRNG keys anywhere in
the state are stored as their key data and re-wrapped on restore.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


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

  :meth:`restore_latest` walks back from the newest step until one restores,
  so a checkpoint that was cut off or corrupted costs only the steps since the
  one before it; it never deletes anything.

  Example:
    >>> ckpt = Checkpointer("runs/x/checkpoints", max_to_keep=2)
    >>> ckpt.save(100, state, rng, {"step": 100})
    >>> step, state, rng, meta = ckpt.restore_latest(state, rng)
  """

  def __init__(self, directory: str, max_to_keep: int):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))

  def save(self, step: int, state, rng, meta: dict) -> None:
    tree = {"state": _keys_to_data(state), "rng": jax.random.key_data(rng)}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)

  def restore_latest(self, state, rng):
    """``(step, state, rng, meta)`` of the newest good checkpoint, or None.

    ``state`` and ``rng`` are templates (structure, shapes, dtypes, shardings).
    """
    template = {"state": _keys_to_data(state), "rng": jax.random.key_data(rng)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any failure means: try an older one
        log.warning("checkpoint %s/%s does not restore (%s: %s); trying an older one",
                    self.directory, step, type(e).__name__, e)
        continue
      tree = restored.state
      return (step, _data_to_keys(tree["state"], state), jax.random.wrap_key_data(tree["rng"]),
              dict(restored.meta))
    if self.manager.all_steps():
      raise RuntimeError(f"{self.directory}: no checkpoint restores (steps "
                         f"{sorted(self.manager.all_steps())}); move the directory away "
                         "to start afresh")
    return None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
