"""Information-gain controller: how hard to intervene on each modality.

ModalImmune, part 3 (``docs/method.md``): every ``T_ctrl`` steps the training
objective is measured on the batch with each modality ``m`` removed,
``IG_m = L(x without m) - L(x)``: how much the prediction currently leans on
``m``. An EMA of ``IG`` (debiased like Adam's moments) sets the intensities

    alpha = (1 - eps) * softmax(EMA(IG) / tau) + eps / M,

a softmax bandit with an exploration floor ``eps``: the modality the model
leans on most is collapsed hardest, so the others must carry the task.

Pure functions on a :class:`ControllerState` (a NamedTuple), jit- and
``shard_map``-safe: with ``axis_name`` the information gains are averaged over
the devices before they enter the EMA, so every device holds the same state.

Example:
  >>> state = init(3)
  >>> ig = information_gain(lambda keep: loss(params, mask(batch, keep)), 3)
  >>> state = update(state, ig, decay=0.9, tau=0.1, explore=0.1)
  >>> state.alpha  # (3,), sums to 1
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

__all__ = ["ControllerState", "init", "intensities", "information_gain", "update"]


class ControllerState(NamedTuple):
  """State of the controller.

  Attributes:
    count: updates taken.
    ema: EMA of the information gains, ``(M,)`` (biased; see :func:`update`).
    ig: the last information gains measured, ``(M,)``.
    alpha: the current intensities, ``(M,)``, summing to 1.
  """
  count: chex.Array
  ema: chex.Array
  ig: chex.Array
  alpha: chex.Array


def init(num_modalities: int) -> ControllerState:
  """Uniform intensities, no statistics yet."""
  zeros = jnp.zeros((num_modalities,), jnp.float32)
  return ControllerState(jnp.zeros([], jnp.int32), zeros, zeros,
                         jnp.full((num_modalities,), 1.0 / num_modalities, jnp.float32))


def intensities(scores: jax.Array, tau: float, explore: float) -> jax.Array:
  """``(1 - explore) * softmax(scores / tau) + explore / M``."""
  m = scores.shape[-1]
  return (1.0 - explore) * jax.nn.softmax(scores / tau) + explore / m


def information_gain(loss_of: Callable[[jax.Array], jax.Array],
                     num_modalities: int, batched: bool = False) -> jax.Array:
  """``IG_m = loss_of(all but m) - loss_of(all)`` for each modality ``m``.

  ``loss_of(keep)`` takes an ``(M,)`` boolean row (which modalities are
  present) and returns the scalar loss on the batch with the others removed.
  The ``M + 1`` evaluations run as one ``vmap``; with ``batched``, ``loss_of``
  takes all ``(M + 1, M)`` rows at once (the first keeps every modality) and
  returns their ``(M + 1,)`` losses, for a caller that shares work between
  the rows (ModalImmune encodes the batch once and fuses it ``M + 1`` times).
  """
  rows = jnp.concatenate([jnp.ones((1, num_modalities), bool),
                          ~jnp.eye(num_modalities, dtype=bool)])
  losses = loss_of(rows) if batched else jax.vmap(loss_of)(rows)
  return losses[1:] - losses[0]


def update(state: ControllerState, ig: jax.Array, *, decay: float, tau: float,
           explore: float, axis_name: str | None = None) -> ControllerState:
  """One controller update from the measured information gains ``ig``.

  ``ema <- decay * ema + (1 - decay) * ig`` and ``alpha`` from the debiased
  ``ema / (1 - decay^count)``. With ``axis_name`` (inside ``shard_map``),
  ``ig`` is first averaged over the devices. Non-finite ``ig`` leaves the
  statistics (``count``, ``ema``, ``alpha``) unchanged; ``ig`` holds what was
  measured, so a caller can see and count the fault (the train step does).
  """
  if axis_name is not None:
    ig = jax.lax.pmean(ig, axis_name)
  ig = jax.lax.stop_gradient(ig).astype(state.ema.dtype)
  count = state.count + 1
  ema = decay * state.ema + (1.0 - decay) * ig
  debiased = ema / (1.0 - decay ** count.astype(ema.dtype))
  new = ControllerState(count, ema, ig, intensities(debiased, tau, explore))
  finite = jnp.all(jnp.isfinite(ig))  # a non-finite statistic is skipped ...
  kept = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
  return kept._replace(ig=ig)  # ... but shown, so the train step can count it
