"""Training methods, one module each, all plugging into one training loop.

:func:`from_config` builds the method that ``config.method.name`` names; the
loop only sees the :class:`~modalimmune_jax.methods.base.Method` it returns.
"""

from __future__ import annotations

from modalimmune_jax.methods import cmpt, consistency, distill, dropout, ebr, modalimmune, plain
from modalimmune_jax.methods.base import Method, ModelFns, reconstruction_loss, task_loss

__all__ = ["Method", "ModelFns", "task_loss", "reconstruction_loss", "METHODS", "from_config"]

# name -> from_config(config, model_fns, dataset) -> Method
METHODS = {
    "plain": plain.from_config,
    "dropout": dropout.from_config,
    "modalimmune": modalimmune.from_config,
    "consistency": consistency.from_config,
    "ebr": ebr.from_config,          # reimplementation (no official code)
    "distill": distill.from_config,  # reimplementation (no official code)
    "cmpt": cmpt.from_config,
}


def from_config(config, model: ModelFns, dataset) -> Method:
  """The method ``config.method.name`` names, for ``model`` on ``dataset``."""
  return METHODS[config.method.name](config, model, dataset)
