"""Cross-modal proxy tokens (Reza et al., TMLR, arXiv 2501.17823): a REIMPLEMENTATION.

The official repository was not readable here (``../shared/BASELINES.md``);
this follows the paper's description carried to our feature model:

* **proxy tokens** (:class:`~modalimmune_jax.model.ProxyTokens`): one learned
  query per (available ``a`` -> missing ``m``) pair reads the frame states of
  ``a``'s encoder under ``a``'s frame mask; a missing modality's embedding is
  the mean of its proxies over the present sources, and it then enters the
  fusion as if present (the model does this, so evaluation uses it too);
* **alignment**: ``task + align_weight * mean D(proxy_{a->m}, sg(z_m))`` over
  the (sample, pair) cells where both ``a`` and ``m`` are present, ``D`` one of
  ``mse`` / ``l1`` / ``cosine`` (the paper does not state it);
* **frozen encoders + LoRA** (:class:`~modalimmune_jax.model.LoRA`, rank 1):
  the paper starts from pretrained unimodal encoders; here one run first
  trains plainly for ``pretrain_steps`` (every parameter except LoRA and the
  proxies; complete samples, the plain method's loss), then freezes the
  encoders' own weights and trains LoRA, proxies, fusion, gate and head with
  the CMPT loss. Freezing is exact: :func:`phase_freeze` zeroes the frozen
  parameters' gradients in front of the optimiser (so the clip norm and
  AdamW's moments see only the trained ones) and their updates after it (so
  AdamW's momentum and weight decay cannot move them);
* **gated fusion** (:class:`~modalimmune_jax.model.GatedFusion`);
* **missingness in training**: sample-eta, the protocol's generator
  (:func:`~modalimmune_jax.masking.sample_eta_presence`), drawn for the
  global batch (:func:`~modalimmune_jax.methods.base.local_rows`), at
  ``train_rate`` (the paper trains at eta = 0.7).

The phase is the number of applied updates: the method state (an int32
counter) and the freeze transforms' states count them, all checkpointed with
the train state, so a resumed run continues in the right phase. A step skipped
for a non-finite value advances neither.

Example:
  >>> config.method.name = "cmpt"     # train.build_model adds the model's parts
  >>> run = train.setup(config)
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import jax
import jax.numpy as jnp
import optax

from modalimmune_jax.masking import PATTERNS
from modalimmune_jax.methods.base import (Method, MethodSpec, ModelFns, cell_mean,
                                          reconstruction_loss)
from modalimmune_jax.methods.dropout import drop_modalities
from modalimmune_jax.methods.plain import supervised_loss
from modalimmune_jax.schema import Key

__all__ = ["Settings", "DISTANCES", "pair_distance", "alignment_loss", "param_group",
           "phase_freeze", "FreezeState", "cmpt", "model_parts", "pretrain_steps", "SPEC"]

DISTANCES = ("mse", "l1", "cosine")


class Settings(NamedTuple):
  """``config.method.cmpt``: "paper" where the paper says it, "ours" where it is silent
  or we differ (``docs/method.md``)."""
  pretrain_fraction: Annotated[float, Key(
      "ours: the paper starts from encoders pretrained elsewhere; we pretrain plainly for "
      "half the run", within="[0, 1)")] = 0.5
  train_rate: Annotated[float, Key(
      "paper: trained at sample-eta 0.7 (MAP protocol)", within="[0, 1]")] = 0.7
  patterns: Annotated[str, Key(
      "paper: MAP \"both\" (text or image missing, 50:50) for 2 modalities; every non-empty "
      "proper subset for more is ours (as MPLMM)", choices=PATTERNS)] = "any"
  align_weight: Annotated[float, Key(
      "paper: loss = task + 0.2 alignment", within="[0, inf)")] = 0.2
  distance: Annotated[str, Key(
      "ours: the paper does not state the distance (`l1`, `cosine` offered)",
      choices=DISTANCES)] = "mse"
  lora_rank: Annotated[int, Key(
      "paper: rank 1, chosen by ablation", integer=True, within="[0, inf)")] = 1  # 0 = none
  lora_targets: Annotated[str, Key(
      "paper: the attention projections, where the encoders have them (the sequence "
      "encoders of MOSI, MOSEI, IEMOCAP); ours for vector data: every encoder linear layer (a "
      "vector encoder has no attention, so `attention` would adapt nothing)",
      choices=("linear", "attention"))] = "linear"
  gated_fusion: Annotated[bool, Key("paper: gating fusion of the modalities")] = True


def pair_distance(proxy: jax.Array, target: jax.Array, distance: str) -> jax.Array:
  """Distance over the last axis: mean squared / mean absolute difference, or
  ``1 - cos``."""
  if distance == "mse":
    return jnp.mean((proxy - target) ** 2, -1)
  if distance == "l1":
    return jnp.mean(jnp.abs(proxy - target), -1)
  if distance == "cosine":
    num = jnp.sum(proxy * target, -1)
    den = jnp.linalg.norm(proxy, axis=-1) * jnp.linalg.norm(target, axis=-1)
    return 1.0 - num / jnp.maximum(den, 1e-8)
  raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def alignment_loss(out: dict, present: jax.Array, distance: str = "mse",
                   axis_name: str | None = None) -> jax.Array:
  """Mean of ``D(proxy_{a->m}, sg(z_m))`` over the (sample, a != m) cells with
  both present. Inside ``shard_map`` the denominator is the device mean of
  the counts, so the step's ``pmean`` gives the global-batch mean exactly."""
  if "proxy_pairs" not in out:
    raise ValueError("cmpt needs a model with proxy tokens (train.build_model adds them "
                     "when method.name = 'cmpt'; MultimodalModel(proxy_tokens=True))")
  pairs, z = out["proxy_pairs"], jax.lax.stop_gradient(out["embeddings"])
  num = z.shape[1]
  present = present.astype(bool)
  valid = present[:, :, None] & present[:, None, :] & ~jnp.eye(num, dtype=bool)[None]
  d = pair_distance(pairs, z[:, None], distance)  # (B, source, target)
  return cell_mean(d, valid, axis_name)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def param_group(path) -> str:
  """``"lora"``, ``"proxy"``, ``"encoder"`` (an encoder's own weights) or
  ``"other"`` for a parameter's pytree path."""
  keys = [_key_name(k) for k in path]
  if "lora_a" in keys or "lora_b" in keys:
    return "lora"
  if keys and keys[0] == "proxies":
    return "proxy"
  if keys and keys[0] == "encoders":
    return "encoder"
  return "other"


class FreezeState(NamedTuple):
  count: jax.Array  # applied updates so far


def phase_freeze(pretrain_steps: int) -> optax.GradientTransformation:
  """Zeroes LoRA's and the proxies' leaves for the first ``pretrain_steps``
  updates and the encoders' own weights afterwards (exact zeros)."""

  def init(params):
    return FreezeState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    pre = state.count < pretrain_steps

    def one(path, u):
      group = param_group(path)
      if group == "other":
        return u
      frozen = ~pre if group == "encoder" else pre
      return jnp.where(frozen, jnp.zeros_like(u), u)

    return jax.tree_util.tree_map_with_path(one, updates), FreezeState(state.count + 1)

  return optax.GradientTransformation(init, update)


def cmpt(model: ModelFns, s: Settings = Settings(), pretrain_steps: int = 0,
         reconstruction_weight: float = 1.0) -> Method:
  """The CMPT method for a model built with proxy tokens (and, usually, LoRA
  and gated fusion: :func:`model_parts`).

  Args:
    model: the model as pure functions.
    s: :class:`Settings` (``pretrain_fraction`` and the model parts are read by
      :func:`from_config` and :func:`model_parts`).
    pretrain_steps: plain steps before the freeze.
    reconstruction_weight: ``mu``, the generator's loss weight.

  Example:
    >>> method = cmpt(model_fns, Settings(distance="cosine"), pretrain_steps=100)
  """
  if s.distance not in DISTANCES:
    raise ValueError(f"distance must be one of {DISTANCES}, got {s.distance!r}")
  if s.patterns not in PATTERNS:
    raise ValueError(f"patterns must be one of {PATTERNS}, got {s.patterns!r}")
  if not 0.0 <= s.train_rate <= 1.0 or pretrain_steps < 0:
    raise ValueError("need 0 <= train_rate <= 1 and pretrain_steps >= 0")
  zero = jnp.zeros([], jnp.float32)

  def pretrain(params, batch, rng, axis_name):
    total, metrics, _ = supervised_loss(model, params, batch, rng, reconstruction_weight,
                                        axis_name)
    # shard_map: lax.cond's branches must agree on which values vary by device
    varying = (lambda x: x) if axis_name is None else (
        lambda x: jax.lax.pcast(x, axis_name, to="varying"))
    return total, dict(metrics, align_loss=varying(zero), kept_fraction=varying(zero + 1.0),
                       adapting=zero)

  def adapt(params, batch, rng, axis_name):
    k_mask, k_model = jax.random.split(rng)
    dropped = drop_modalities(batch, k_mask, model.names, s.train_rate, axis_name,
                              "sample_eta", s.patterns)
    out = model.apply(params, dropped, k_model, axis_name=axis_name)
    task = model.task_loss(out["outputs"], dropped["labels"])
    # per-device counts of present cells differ: global denominators (exact over devices)
    recon = reconstruction_loss(out, dropped["presence"], axis_name)
    align = alignment_loss(out, dropped["presence"], s.distance, axis_name)
    total = task + reconstruction_weight * recon
    metrics = dict(task_loss=task, recon_loss=recon, align_loss=align,
                   kept_fraction=jnp.mean(dropped["presence"].astype(jnp.float32)),
                   adapting=zero + 1.0)
    return total + s.align_weight * align, metrics

  def loss(params, state, batch, rng, axis_name=None):
    if pretrain_steps == 0:
      total, metrics = adapt(params, batch, rng, axis_name)
    else:
      total, metrics = jax.lax.cond(
          state < pretrain_steps,
          lambda: pretrain(params, batch, rng, axis_name),
          lambda: adapt(params, batch, rng, axis_name))
    return total, 0.0, metrics

  def update(state, params, batch, rng, step, axis_name=None):
    return state + 1, {}

  freeze = phase_freeze(pretrain_steps)
  return Method("cmpt", init=lambda params: jnp.zeros([], jnp.int32), loss=loss,
                update=update, transforms=(freeze,), post_transforms=(freeze,))


def model_parts(s: Settings) -> dict:
  """The ``MultimodalModel`` arguments CMPT needs: proxy tokens, LoRA, gate."""
  return dict(proxy_tokens=True, lora_rank=s.lora_rank, lora_targets=s.lora_targets,
              gated_fusion=s.gated_fusion)


def pretrain_steps(config) -> int:
  """``round(pretrain_fraction * train.steps)``."""
  return int(round(config.method.cmpt.pretrain_fraction * config.train.steps))


def from_config(s: Settings, config, model: ModelFns, dataset) -> Method:
  return cmpt(model, s, pretrain_steps(config), config.method.reconstruction_weight)


SPEC = MethodSpec(
    "cmpt", from_config, Settings, model_parts=model_parts, label="reimpl.",
    about="Reimplementation from the paper (the official repository was not readable).",
    search=tuple({"method.cmpt.align_weight": w} for w in (0.05, 0.2, 1.0)))
