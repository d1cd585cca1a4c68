"""Modality dropout: train on randomly removed modalities.

No single reference (``../shared/BASELINES.md``); ``convention`` picks how the
removed cells are drawn, each with the protocol's own generator
(:mod:`modalimmune_jax.masking`, one place per primitive), so training can use
the missing-rate meaning a table is evaluated under:

* ``"independent"`` (default; ours): each (sample, modality) cell removed with
  its modality's rate, independently, at least one modality kept per sample (a
  sample that would lose all keeps one, chosen uniformly):
  :func:`~modalimmune_jax.masking.random_presence`, the protocol's
  ``random_missing``;
* ``"cell_eta"`` (CPM-Net / GCNet, who train at the test rate): exactly
  ``round(rate * B * M)`` of the batch's cells removed, at least one modality
  kept per sample, ``rate <= (M - 1) / M``:
  :func:`~modalimmune_jax.masking.cell_eta_presence`, the protocol's
  ``cell_missing``;
* ``"sample_eta"`` (MAP / CMPT; MPLMM's per-sample patterns, ``src/mosidata.py``,
  draw one of the ``2^M - 2`` patterns for a sample with probability 0.6-0.7):
  ``round(rate * B)`` samples of the batch miss one or more modalities, split
  equally between the ``patterns`` of :func:`~modalimmune_jax.masking.keep_patterns`:
  :func:`~modalimmune_jax.masking.sample_eta_presence`, the protocol's
  ``sample_missing``;
* ``"mmdrop"`` (georgepar/slp ``slp/modules/mmdrop.py``, ``HardMultimodalDropout``):
  with probability ``rate``, one draw per batch, every sample of the batch
  loses one modality, the modalities split equally between the samples
  (``sample_eta_presence`` at rate 1 with the ``"single"`` patterns; slp draws
  each sample's modality independently and uniformly, which has the same
  mean). slp also multiplies every modality by ``1 / (1 - rate / M)``, in
  evaluation too; we do not rescale (removal as at test time, below).

Every convention removes a modality exactly as the protocol does
(:func:`~modalimmune_jax.masking.remove_modalities`: features zeroed, frames
masked, presence bit off). The pattern is drawn for the global batch from the
step's key (the same on every device) and each device takes its rows
(:func:`~modalimmune_jax.methods.base.local_rows`), so N devices train
exactly as one.
"""

from __future__ import annotations

from typing import Annotated, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from modalimmune_jax.schema import ConfigError, Key
from modalimmune_jax.masking import (PATTERNS, cell_eta_presence, keep_patterns,
                                     max_cell_eta, missing_count, random_presence,
                                     remove_modalities, sample_eta_presence)
from modalimmune_jax.methods.base import (Method, MethodSpec, ModelFns, global_batch_size,
                                          local_rows)
from modalimmune_jax.methods.plain import supervised_loss

__all__ = ["CONVENTIONS", "Settings", "dropout_presence", "drop_modalities",
           "expected_kept_fraction", "modality_dropout", "SPEC"]

CONVENTIONS = ("independent", "cell_eta", "sample_eta", "mmdrop")


class Settings(NamedTuple):
  """``config.method.dropout``."""
  rate: Annotated[float, Key(
      "ours: the field has no single rate (MPLMM 0.6-0.7 per sample, slp's p per batch, "
      "GCNet the test rate), so it is tuned around the middle of the evaluated rates (0.5 "
      "both per cell and at cell-eta)", within="[0, 1)")] = 0.3
  rates: Annotated[tuple, Key(
      "ours: one rate for every modality (per-modality rates are an option, `independent` "
      "only)", each=Key(within="[0, 1)"))] = ()
  convention: Annotated[str, Key(
      "ours: per cell, the BASELINES.md choice; `cell_eta` (code: GCNet, CPM-Net), "
      "`sample_eta` (code: MAP, MPLMM), `mmdrop` (code: slp) are the field's, see "
      "`docs/method.md`", choices=CONVENTIONS)] = "independent"
  patterns: Annotated[str, Key(
      "code: MPLMM `src/mosidata.py` draws one of all 6 missing patterns of 3 modalities; "
      "for 2 modalities both settings are MAP's", choices=PATTERNS)] = "any"


def _check(convention: str, rates, num_modalities: int, patterns: str) -> None:
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
  if patterns not in PATTERNS:
    raise ValueError(f"patterns must be one of {PATTERNS}, got {patterns!r}")
  if convention != "independent" and jnp.ndim(rates) != 0:
    raise ValueError(f"convention {convention!r} takes one rate, not one per modality")
  if convention == "cell_eta" and float(rates) > max_cell_eta(num_modalities) + 1e-9:
    raise ValueError(f"cell eta {float(rates)} exceeds (M-1)/M = "
                     f"{max_cell_eta(num_modalities):.4g} for M = {num_modalities}")


def dropout_presence(key: jax.Array, num_samples: int, num_modalities: int,
                     rates: float | Sequence[float] = 0.3, convention: str = "independent",
                     patterns: str = "any") -> jax.Array:
  """``(N, M)`` kept cells of one batch under ``convention`` (module docstring).

  ``rates``: one rate, or (``"independent"`` only) one per modality. Every
  convention keeps at least one modality per sample. ``"independent"`` is
  exactly ``random_presence(key, N, rates)``.

  Example:
    >>> keep = dropout_presence(jax.random.key(0), 64, 3, 0.5, "cell_eta")  # 96 cells off
  """
  _check(convention, rates, num_modalities, patterns)
  n, m = num_samples, num_modalities
  if convention == "independent":
    return random_presence(key, n, jnp.broadcast_to(jnp.asarray(rates, jnp.float32), (m,)))
  if convention == "cell_eta":
    return cell_eta_presence(key, n, m, float(rates))
  if convention == "sample_eta":
    return sample_eta_presence(key, n, m, float(rates), patterns)
  k_hit, k_which = jax.random.split(key)  # mmdrop
  hit = jax.random.uniform(k_hit) < rates
  return sample_eta_presence(k_which, n, m, 1.0, "single") | ~hit


def drop_modalities(batch: dict, key: jax.Array, names: Sequence[str],
                    rates: float | Sequence[float] = 0.3, axis_name: str | None = None,
                    convention: str = "independent", patterns: str = "any") -> dict:
  """``batch`` with cells removed by :func:`dropout_presence`, drawn for the
  *global* batch and cut to this device's rows (:func:`local_rows`), so N
  devices remove exactly what one device would.

  Example:
    >>> dropped = drop_modalities(batch, key, model.names, 0.5, convention="cell_eta")
  """
  n = global_batch_size(batch, axis_name)
  keep = dropout_presence(key, n, len(names), rates, convention, patterns)
  return remove_modalities(batch, local_rows(keep, axis_name), names)


def expected_kept_fraction(num_samples: int, num_modalities: int, rate: float,
                           convention: str, patterns: str = "any") -> float:
  """The mean fraction of kept cells per batch under a convention with one rate.

  Example:
    >>> expected_kept_fraction(64, 3, 0.5, "cell_eta")  # 1 - 96 / 192
    0.5
  """
  _check(convention, rate, num_modalities, patterns)
  n, m = num_samples, num_modalities
  if convention == "independent":  # minus the rescued cells of all-missing samples
    return 1.0 - (rate - rate ** m / m)
  if convention == "cell_eta":
    return 1.0 - missing_count(n, m, rate) / (n * m)
  if convention == "sample_eta":  # the patterns' counts are equal in expectation
    lost = 1.0 - keep_patterns(m, patterns).mean()
    return 1.0 - round(rate * n) / n * lost
  return 1.0 - rate / m  # mmdrop


def modality_dropout(model: ModelFns, rates: float | Sequence[float] = 0.3,
                     reconstruction_weight: float = 1.0, convention: str = "independent",
                     patterns: str = "any") -> Method:
  """Modality dropout at ``rates`` under ``convention`` (one rate, or one per
  modality for ``"independent"``); ``patterns`` for ``"sample_eta"``.

  Example:
    >>> method = modality_dropout(model_fns, rates=(0.1, 0.5, 0.5))
    >>> method = modality_dropout(model_fns, 0.5, convention="cell_eta")
  """
  m = len(model.names)
  _check(convention, rates, m, patterns)

  def loss(params, state, batch, rng, axis_name=None):
    k_mask, k_model = jax.random.split(rng)
    dropped = drop_modalities(batch, k_mask, model.names, rates, axis_name, convention, patterns)
    total, metrics, _ = supervised_loss(model, params, dropped, k_model,
                                        reconstruction_weight, axis_name)
    metrics["kept_fraction"] = jnp.mean(dropped["presence"].astype(jnp.float32))
    return total, 0.0, metrics

  return Method("dropout", init=lambda params: (), loss=loss)


def _validate(d: Settings) -> None:
  if len(d.rates) and d.convention != "independent":
    raise ConfigError("config key 'method.dropout.rates' (one rate per modality) needs "
                      "'method.dropout.convention' 'independent'; use 'method.dropout.rate'")


def from_config(d: Settings, config, model: ModelFns, dataset) -> Method:
  if len(d.rates) not in (0, len(model.names)):
    raise ConfigError(f"config key 'method.dropout.rates' needs one rate per modality "
                      f"{model.names}, got {tuple(d.rates)}")
  top = max_cell_eta(len(model.names))
  if d.convention == "cell_eta" and d.rate > top + 1e-9:
    raise ConfigError(f"config key 'method.dropout.rate' is a cell eta here (convention "
                      f"'cell_eta'): at most (M-1)/M = {top:.4g} for {len(model.names)} "
                      f"modalities, got {d.rate}")
  rates = tuple(d.rates) if len(d.rates) else d.rate
  return modality_dropout(model, rates, config.method.reconstruction_weight, d.convention,
                          d.patterns)


SPEC = MethodSpec(
    "dropout", from_config, Settings, validate=_validate,
    # its rate, per cell (ours) and at the cell-eta convention (GCNet trains at the test
    # rate; 0.5 is the middle of the evaluated etas)
    search=({"method.dropout.rate": 0.3}, {"method.dropout.rate": 0.5},
            {"method.dropout.convention": "cell_eta", "method.dropout.rate": 0.5}))
