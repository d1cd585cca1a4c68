"""OPM, On-the-fly Prediction Modulation (Wei et al., TPAMI 2024, arXiv 2410.11582):
drop the dominant modality's features at random during training.

Reimplemented from the authors' code, GeWu-Lab/BML_TPAMI2024 (which does not run
as published: a stray bracket in ``code/models/Classifier.py``, a missing
``utils.log_file``), and its port in GeWu-Lab/BalanceBenchmark. Per batch:

1. **Scores** (:mod:`~modalimmune_jax.methods.balance`): ``score_m`` over the
   global batch, from our zeroed-others analogue of the code's concat-head split
   (each modality alone, the others removed), detached; ``r_m = score_m /
   ref_m``, ``ref_m`` the other score for two modalities and, for more,
   the sum of the others (BalanceBenchmark ``OPM_trainer.py:174-181``).
2. **Drop probabilities** (:func:`drop_probabilities`, the code's ``calcu_q``,
   ``Classifier.py:58-72``): ``ratio_m = tanh(relu(r_m - 1))``; ``q_m = q_base
   (1 + lam ratio_m)`` when ``ratio_m > 0``, else 0; clipped to ``[0, 1]``.
   At most one modality has ``r_m > 1`` (its score exceeds the others' sum), so
   only the dominant modality is ever dropped; with three modalities that is
   rare (80-step synthetic runs, classification and MOSI-shaped regression: never;
   ``docs/method.md``), with two the stronger one always is. ``reference="min"``
   (BalanceBenchmark's rule for OGM, ``OGM_trainer.py:144-145``; a setting of
   ours for OPM, in its tuning trials) divides by the weakest other score: every
   modality scoring above the weakest may be dropped, the weakest never, so no
   sample loses every modality.
3. **Drop** (:func:`opm_drops`, ``Modality_drop.execute_drop``,
   ``Classifier.py:31-55``): with probability ``p_exe``, one draw per batch from
   the step key (``:34``), each sample's embedding ``z_m`` is zeroed with
   probability ``q_m`` (``:45-48``; drawn for the global batch, each device
   taking its rows with :func:`~modalimmune_jax.methods.base.local_rows`), and
   every embedding is divided by ``1 - theta``, ``theta = sum_m d_m q_m /
   sum_m d_m`` (``:38-41, 49``; ``d_m`` the embedding width, ``model.hidden``
   for every modality here, so ``theta = mean_m q_m``). In front of the fusion,
   through ``embedding_hook``; training only (evaluation runs the model alone).
4. **Loss**: the fused task loss on the modulated embeddings (the code trains
   only the fused cross-entropy, ``code/main.py:104, 114``), plus ``mu`` times
   the reconstruction loss, as every method here.

Our choices, each a setting:

* **Presence bit of a dropped cell**: kept on (``drop_as_missing = False``):
  the code zeroes the feature and its concat head still reads the zeros, and
  our fusion, reading the presence bit, then takes the zero embedding as the
  modality's token (plus its modality embedding and property vector). With
  ``drop_as_missing`` the cell is also marked missing, so the fusion fills or
  masks it as at test time (an ablation row: OPM as a modality dropout aimed at
  the dominant modality).
* **Warm-up** in steps (``warmup_steps``): the code warms up for epochs 0-5 of
  100 (``code/main.py:91``, ``warm_up = 1 if epoch <= 5``); epochs have no
  fixed size here, so the default is the optimiser's learning-rate warm-up,
  50 steps (a quarter of synthetic's 200 steps, 2 % of the pickle data sets'
  3000).

The step index the warm-up reads is the method state (``update`` writes the
index of the next step), checkpointed with the train state.

Example:
  >>> method = opm(model_fns, Settings(q_base=0.4, warmup_steps=0))
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import jax
import jax.numpy as jnp

from modalimmune_jax.methods.balance import modality_scores, score_ratios
from modalimmune_jax.methods.base import (Method, MethodSpec, ModelFns, global_batch_size,
                                          local_rows)
from modalimmune_jax.methods.plain import supervised_loss
from modalimmune_jax.schema import ConfigError, Key

__all__ = ["Settings", "drop_probabilities", "opm_drops", "opm_hook", "opm", "SPEC"]


class Settings(NamedTuple):
  """``config.method.opm`` (sources: GeWu-Lab/BML_TPAMI2024, ``docs/method.md``)."""
  q_base: Annotated[float, Key(
      "code: `code/scripts/train_opm.sh` `--q_base 0.5` (`code/config.py` 0.4; BalanceBenchmark "
      "0.4)", within="[0, 1]")] = 0.5
  lam: Annotated[float, Key(
      "code: `code/scripts/train_opm.sh` `--lam 0.5` (`calcu_q`'s `fix_lambda`)",
      within="[0, inf)")] = 0.5
  p_exe: Annotated[float, Key(
      "code: `--p_exe 0.7`, the probability a batch is modulated at all",
      within="[0, 1]")] = 0.7
  warmup_steps: Annotated[int, Key(
      "ours: the code warms up 6 of 100 epochs (`code/main.py:91`); in steps, the "
      "optimiser's learning-rate warm-up (50)", integer=True, within="[0, inf)")] = 50
  reference: Annotated[str, Key(
      "code: BalanceBenchmark's OPM divides by the sum of the others (`OPM_trainer.py:174-181`), "
      "under which no modality of 3 or more is ever dropped on our data; `min` (its OGM rule, "
      "`OGM_trainer.py:144-145`) drops every modality scoring above the weakest, never the "
      "weakest itself (ours, tuned)", choices=("sum", "min"))] = "sum"
  drop_as_missing: Annotated[bool, Key(
      "ours: off as in the code (a dropped embedding is zeroed and the fusion reads the "
      "zeros); on: the cell is also marked missing (filled or masked as at test time)")] = False


def drop_probabilities(ratios: jax.Array, q_base: float, lam: float
                       ) -> tuple[jax.Array, jax.Array]:
  """``(q, ratio)``: the code's ``calcu_q`` on score ratios ``r_m`` (``(M,)``):
  ``ratio_m = tanh(relu(r_m - 1))``, ``q_m = clip(q_base (1 + lam ratio_m), 0, 1)``
  where ``ratio_m > 0``, else 0.

  Example:
    >>> q, _ = drop_probabilities(jnp.array([2.0, 0.5]), 0.5, 0.5)  # [0.5 (1 + 0.5 tanh 1), 0]
  """
  ratio = jnp.tanh(jax.nn.relu(ratios - 1.0))
  q = jnp.where(ratio > 0, q_base * (1.0 + lam * ratio), 0.0)
  return jnp.clip(q, 0.0, 1.0), ratio


def opm_drops(key: jax.Array, q: jax.Array, p_exe: float, num_samples: int,
              active: jax.Array | bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(drop (N, M), execute, theta)`` of one (global) batch: ``execute`` with
  probability ``p_exe`` (one draw) when ``active``; then cell ``(i, m)`` dropped
  with probability ``q_m``; ``theta = mean_m q_m`` (equal widths), 0 when not
  executed.

  Example:
    >>> drop, execute, theta = opm_drops(key, jnp.array([0.6, 0.0]), 0.7, 64)
  """
  k_exe, k_cell = jax.random.split(key)
  execute = jnp.asarray(active, bool) & (jax.random.uniform(k_exe) < p_exe)
  drop = (jax.random.uniform(k_cell, (num_samples, q.shape[0])) < q[None, :]) & execute
  theta = jnp.where(execute, jnp.mean(q), 0.0)
  return drop, execute, theta


def opm_hook(drop: jax.Array, theta: jax.Array, drop_as_missing: bool = False):
  """``embedding_hook``: ``z_m`` zeroed where ``drop`` (this device's rows),
  every embedding divided by ``1 - theta``; the dropped cells' presence bits
  turned off only with ``drop_as_missing``.

  Example:
    >>> out = model_fns.apply(params, batch, rng, hook=opm_hook(drop, theta))
  """
  def hook(z, present):
    z = jnp.where(drop[..., None], jnp.zeros([], z.dtype), z) / (1.0 - theta).astype(z.dtype)
    return z, (present & ~drop) if drop_as_missing else present
  return hook


def opm(model: ModelFns, s: Settings = Settings(), reconstruction_weight: float = 1.0
        ) -> Method:
  """The OPM method (module docstring); its state is the index of the step to come.

  Example:
    >>> method = opm(model_fns, Settings(warmup_steps=0))
    >>> loss, _, metrics = method.loss(params, method.init(params), batch, rng)
  """
  if len(model.names) < 2:
    raise ValueError("OPM needs at least two modalities")
  names = model.names

  def loss(params, state, batch, rng, axis_name=None):
    k_drop, k_model = jax.random.split(rng)
    scores = modality_scores(model, params, batch, k_model, axis_name)
    q, ratio = drop_probabilities(score_ratios(scores, s.reference), s.q_base, s.lam)
    drop, execute, theta = opm_drops(k_drop, q, s.p_exe, global_batch_size(batch, axis_name),
                                     state >= s.warmup_steps)
    drop = local_rows(drop, axis_name)
    total, metrics, _ = supervised_loss(model, params, batch, k_model, reconstruction_weight,
                                        axis_name, hook=opm_hook(drop, theta, s.drop_as_missing))
    metrics.update({f"score/{n}": scores[j] for j, n in enumerate(names)})
    metrics.update({f"ratio/{n}": ratio[j] for j, n in enumerate(names)})
    metrics.update({f"q/{n}": q[j] for j, n in enumerate(names)})
    metrics.update({"opm/executed": execute.astype(jnp.float32), "opm/theta": theta,
                    "opm/dropped_fraction": jnp.mean(drop.astype(jnp.float32))})
    return total, 0.0, metrics

  def update(state, params, batch, rng, step, axis_name=None):
    return (step + 1).astype(jnp.int32), {}

  return Method("opm", init=lambda params: jnp.zeros([], jnp.int32), loss=loss, update=update)


def from_config(s: Settings, config, model: ModelFns, dataset) -> Method:
  if len(model.names) < 2:
    raise ConfigError(f"method 'opm' needs at least two modalities, the data has "
                      f"{model.names}")
  return opm(model, s, config.method.reconstruction_weight)


SPEC = MethodSpec(
    "opm", from_config, Settings, label="reimpl., official code",
    about=("Reimplementation from the authors' code (GeWu-Lab/BML_TPAMI2024, BalanceBenchmark);\n"
           "the per-modality scores are our zeroed-others analogue of its concat-head split, "
           "and for\nregression `exp(-|y - yhat_m|)` stands for `softmax[label]` "
           "(`docs/method.md`)."),
    # the code's rule and q_base, and the `min` rule (the only one that drops anything
    # with 3 or more modalities here) at the code's q_base and below
    search=({"method.opm.q_base": 0.5},
            {"method.opm.reference": "min", "method.opm.q_base": 0.3},
            {"method.opm.reference": "min", "method.opm.q_base": 0.5}),
    ablations={"opm": {}, "drops marked missing": {"method.opm.drop_as_missing": True}})
