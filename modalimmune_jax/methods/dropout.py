"""Modality dropout: train on randomly removed modalities.

``../shared/BASELINES.md`` lists what the field does (one modality per batch,
per-sample patterns, train at the test rate). Ours: each (sample, modality)
cell is removed with its modality's rate, independently per sample, at least
one modality kept per sample (a sample that would lose all keeps one, chosen
uniformly), and a removed modality is handled exactly as at test time
(:func:`modalimmune_jax.masking.remove_modalities`: features zeroed, frames
masked, presence bit off). No rescaling of the kept modalities. The pattern
is drawn for the global batch and each device takes its rows, so N devices
train exactly as one.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from modalimmune_jax.masking import random_presence, remove_modalities
from modalimmune_jax.methods.base import Method, ModelFns, global_batch_size, local_rows
from modalimmune_jax.methods.plain import supervised_loss

__all__ = ["modality_dropout", "from_config"]


def modality_dropout(model: ModelFns, rates: float | Sequence[float] = 0.3,
                     reconstruction_weight: float = 1.0) -> Method:
  """Per-sample, per-modality dropout at ``rates`` (one rate, or one per modality).

  Example:
    >>> method = modality_dropout(model_fns, rates=(0.1, 0.5, 0.5))
  """
  m = len(model.names)
  rates = jnp.broadcast_to(jnp.asarray(rates, jnp.float32), (m,))

  def loss(params, state, batch, rng, axis_name=None):
    k_mask, k_model = jax.random.split(rng)
    n_global = global_batch_size(batch, axis_name)
    keep = local_rows(random_presence(k_mask, n_global, rates), axis_name)
    dropped = remove_modalities(batch, keep, model.names)
    total, metrics, _ = supervised_loss(model, params, dropped, k_model,
                                        reconstruction_weight, axis_name)
    metrics["kept_fraction"] = jnp.mean(dropped["presence"].astype(jnp.float32))
    return total, 0.0, metrics

  return Method("dropout", init=lambda params: (), loss=loss)


def from_config(config, model: ModelFns, dataset) -> Method:
  d = config.method.dropout
  if len(d.rates) not in (0, len(model.names)):
    from modalimmune_jax.config import ConfigError
    raise ConfigError(f"config key 'method.dropout.rates' needs one rate per modality "
                      f"{model.names}, got {tuple(d.rates)}")
  rates = tuple(d.rates) if len(d.rates) else d.rate
  return modality_dropout(model, rates, config.method.reconstruction_weight)
