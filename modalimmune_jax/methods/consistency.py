"""Consistency regularisation with perturbations (Cai et al. 2025, arXiv 2505.19616).

A baseline of ``../shared/BASELINES.md``, after the authors' code
(luisrui/Modality-Interference-in-MLLMs, ``modules/models/LLaVA_unified.py``,
``LLaVA_ad_attacks.py``, ``LLaVA_consistency_regularization.py``,
``modules/data/LlavaDataset.py``), carried from an MLLM's token embeddings to
our per-modality feature model. Per sample one *target* modality is drawn
(uniformly among its present modalities, or among ``targets``), and:

* **heuristic copy** ``H`` (the authors' dataset-level augmentations: the
  irrelevant image replaced by noise, by another sample's, or blanked): the
  target modality's features zeroed (``"zero"``, presence kept), replaced by
  Gaussian noise on its real frames (``"noise"``), or swapped in, with its
  frame mask, from another sample of the global batch (``"swap"``); one kind
  per sample, uniformly from ``heuristics``; labels unchanged;
* **adversarial copy** (``LLaVA_ad_attacks.py``): PGD on the target modality's
  embedding ``z_m`` (through the model's ``embedding_hook``), model frozen
  during the attack (parameters under ``stop_gradient``), start
  ``delta ~ U(-eps, eps)``, ``pgd_steps`` steps of
  ``delta <- clip(delta + a * grad, -eps, eps)`` with the raw gradient of the
  task loss; of the rows ``[X; H]``, as the authors attack the combined batch;
* **objective** (``LLaVA_unified.py``)::

      CE(clean [X; H]) + CE(PGD [X; H])
        + w * mean_copies D(P_copy || stop_gradient(P_clean X))

  the copies being ``H``, ``PGD(X)`` and ``PGD(H)``, each compared with its own
  clean sample; ``D`` is the KL at temperature ``T`` (``"kl"``), the textbook
  Jensen-Shannon divergence (``"js"``) or the authors' "JS" variant
  ``0.5 [KL(M || P) + KL(M || Q)]`` (``"js_authors"``); for regression, the
  squared difference of the predictions. Plus ``mu`` times the model's
  reconstruction loss on the clean ``X``, as every method here.

Every per-sample draw (target, heuristic kind, noise, swap partner, PGD start)
is made for the global batch and sliced with
:func:`~modalimmune_jax.methods.base.local_rows`, and the swap reads the
gathered global batch, so N devices train exactly as one.

Example:
  >>> method = consistency(model_fns, Settings(divergence="js_authors", pgd_steps=1))
  >>> loss, _, metrics = method.loss(params, method.init(params), batch, jax.random.key(0))
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import jax
import jax.numpy as jnp

from modalimmune_jax.methods.base import (Method, MethodSpec, ModelFns, global_batch_size,
                                          local_rows, reconstruction_loss)
from modalimmune_jax.schema import ConfigError, Key

__all__ = ["Settings", "HEURISTICS", "DIVERGENCES", "PROB_FLOOR", "kl_divergence",
           "js_divergence", "js_authors_divergence", "divergence", "choose_targets",
           "heuristic_copy", "pgd_delta", "consistency", "SPEC"]

HEURISTICS = ("zero", "noise", "swap")
DIVERGENCES = ("kl", "js", "js_authors")
# The authors floor the probabilities at 1e-6 and renormalise them before the
# KL (LLaVA_unified.py) and before the mixture of their JS.
PROB_FLOOR = 1e-6


class Settings(NamedTuple):
  """``config.method.consistency``; the sources in ``docs/method.md``."""
  heuristics: Annotated[tuple, Key(
      "code: blank / noise / switch (`LlavaDataset.py`); the feature-input analogue is ours",
      each=Key(choices=HEURISTICS))] = HEURISTICS
  noise_std: Annotated[float, Key(
      "ours: the features are standardised, so unit noise has the signal's scale",
      within="[0, inf)")] = 1.0
  pgd_steps: Annotated[int, Key(
      "code: training configs use 1-2 (llava-v1.5-7b: 2); signature default 3",
      integer=True, within="[0, inf)")] = 2  # 0: no adversarial copy
  pgd_step_size: Annotated[float, Key(
      "code: training configs (`a`); signature default 0.005", within="(0, inf)")] = 0.1
  pgd_eps: Annotated[float, Key(
      "code: training configs; signature default 0.03. Tuned because the authors' scale is "
      "LLM token embeddings, ours layer-normalised encoder outputs", within="[0, inf)")] = 1e-3
  pgd_detach: Annotated[bool, Key(
      "code: the attacked copy's embeddings are detached")] = True
  weight: Annotated[float, Key(
      "code: training configs (`w`; 0.001 for the larger model); tuned with `pgd_eps`",
      within="[0, inf)")] = 0.01
  temperature: Annotated[float, Key(
      "code: training configs (`T`)", within="(0, inf)")] = 1.0
  divergence: Annotated[str, Key(
      "code: the KL configs; `js_authors` is their \"JS\", `js` the textbook one (ours)",
      choices=DIVERGENCES)] = "kl"
  targets: Annotated[tuple, Key(
      "ours: every modality may be perturbed (no modality is \"irrelevant\" in our data, "
      "unlike the authors' image-question pairs)")] = ()  # () = every modality


# ------------------------------------------------------------ divergences ----

def _per_sample(x: jax.Array) -> jax.Array:
  """Sum over every axis but the first (multi-label: over the labels too)."""
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _floored(logits: jax.Array, temperature: float) -> jax.Array:
  p = jnp.maximum(jax.nn.softmax(logits / temperature, axis=-1), PROB_FLOOR)
  return p / jnp.sum(p, axis=-1, keepdims=True)


def kl_divergence(perturbed: jax.Array, clean: jax.Array,
                  temperature: float = 1.0) -> jax.Array:
  """``KL(Q || P)`` per sample, ``Q = softmax(perturbed / T)`` floored at
  :data:`PROB_FLOOR` and renormalised, ``P = softmax(clean / T)``: the authors'
  ``F.kl_div(log_softmax(clean / T), q)``. Logits ``(B, C)`` or ``(B, C, 2)``.

  Example:
    >>> kl_divergence(jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0]]))  # [0.]
  """
  log_p = jax.nn.log_softmax(clean / temperature, axis=-1)
  q = _floored(perturbed, temperature)
  return _per_sample(jnp.sum(q * (jnp.log(q) - log_p), axis=-1))


def js_divergence(perturbed: jax.Array, clean: jax.Array,
                  temperature: float = 1.0) -> jax.Array:
  """The textbook Jensen-Shannon divergence per sample,
  ``0.5 KL(P || M) + 0.5 KL(Q || M)``, ``M = (P + Q) / 2`` (no floor)."""
  log_p = jax.nn.log_softmax(clean / temperature, axis=-1)
  log_q = jax.nn.log_softmax(perturbed / temperature, axis=-1)
  log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0)
  terms = 0.5 * (jnp.exp(log_p) * (log_p - log_m) + jnp.exp(log_q) * (log_q - log_m))
  return _per_sample(jnp.sum(terms, axis=-1))


def js_authors_divergence(perturbed: jax.Array, clean: jax.Array,
                          temperature: float = 1.0) -> jax.Array:
  """The authors' "JS" per sample (``LLaVA_consistency_regularization.py``):
  ``0.5 [KL(M || P) + KL(M || Q)]``, ``M = (P' + Q') / 2`` with ``P', Q'``
  floored at :data:`PROB_FLOOR` and renormalised, ``log P``, ``log Q`` the plain
  log-softmax. Not the Jensen-Shannon divergence (:func:`js_divergence`): the
  KLs run from the mixture to each distribution."""
  log_p = jax.nn.log_softmax(clean / temperature, axis=-1)
  log_q = jax.nn.log_softmax(perturbed / temperature, axis=-1)
  m = 0.5 * (_floored(clean, temperature) + _floored(perturbed, temperature))
  log_m = jnp.log(m)
  terms = 0.5 * (m * (log_m - log_p) + m * (log_m - log_q))
  return _per_sample(jnp.sum(terms, axis=-1))


_DIVERGENCE_FNS = {"kl": kl_divergence, "js": js_divergence,
                   "js_authors": js_authors_divergence}


def divergence(task: str, name: str, perturbed: jax.Array, clean: jax.Array,
               temperature: float = 1.0) -> jax.Array:
  """The consistency term per sample: ``name`` of :data:`DIVERGENCES` between
  the predicted distributions, or for regression ``(perturbed - clean)^2``.
  ``clean`` is used as given (the caller stops its gradient)."""
  if task == "regression":
    return _per_sample((perturbed - clean) ** 2)
  return _DIVERGENCE_FNS[name](perturbed, clean, temperature)


# ----------------------------------------------------------- perturbations ----

def choose_targets(u: jax.Array, present: jax.Array, allowed: jax.Array) -> jax.Array:
  """``(B, M)`` one-hot target per sample: the ``floor(u * count)``-th of its
  present, allowed modalities (uniform for ``u ~ U[0, 1)``; none if it has none)."""
  candidates = present.astype(bool) & allowed[None, :]
  count = jnp.sum(candidates, axis=1)
  k = jnp.minimum(jnp.floor(u * count).astype(jnp.int32), count - 1)
  position = jnp.cumsum(candidates, axis=1) - 1
  return candidates & (position == k[:, None])


def _gather_global(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def heuristic_copy(batch: dict, target: jax.Array, key: jax.Array, names: tuple[str, ...],
                   heuristics: tuple[str, ...] = HEURISTICS, noise_std: float = 1.0,
                   axis_name: str | None = None) -> dict:
  """The batch with each sample's ``target`` modality perturbed by one kind of
  ``heuristics`` (uniform per sample): zeroed, Gaussian noise on its real frames,
  or swapped in (features, frame mask, presence bit) from another sample of the
  global batch (a random cyclic permutation, never the sample itself).

  Args:
    batch: the local rows; ``target``: ``(B, M)`` one-hot (all False: untouched).
    key: the same on every device (draws are made for the global batch).
  """
  n = global_batch_size(batch, axis_name)
  k_kind, k_noise, k_swap = jax.random.split(key, 3)
  kind = local_rows(jax.random.randint(k_kind, (n,), 0, len(heuristics)), axis_name)
  if "swap" in heuristics:
    order = jax.random.permutation(k_swap, n)
    source = local_rows(jnp.zeros((n,), jnp.int32).at[order].set(jnp.roll(order, -1)),
                        axis_name)
    presence_all = _gather_global(batch["presence"], axis_name)
  inputs, masks = dict(batch["inputs"]), dict(batch["masks"])
  presence = batch["presence"]
  for j, m in enumerate(names):
    x, mask, t = inputs[m], masks[m], target[:, j]
    new_x, new_mask, new_p = x, mask, presence[:, j]
    for i, h in enumerate(heuristics):
      hit = t & (kind == i)
      if h == "zero":
        variant, v_mask, v_p = jnp.zeros_like(x), mask, presence[:, j]
      elif h == "noise":
        noise = local_rows(jax.random.normal(jax.random.fold_in(k_noise, j),
                                             (n,) + x.shape[1:], x.dtype), axis_name)
        variant = jnp.where(mask[..., None], noise_std * noise, 0.0)
        v_mask, v_p = mask, presence[:, j]
      elif h == "swap":
        variant = _gather_global(x, axis_name)[source]
        v_mask = _gather_global(mask, axis_name)[source]
        v_p = presence_all[source, j]
      else:
        raise ValueError(f"unknown heuristic {h!r}; use {HEURISTICS}")
      new_x = jnp.where(hit[:, None, None], variant.astype(x.dtype), new_x)
      new_mask = jnp.where(hit[:, None], v_mask, new_mask)
      new_p = jnp.where(hit, v_p, new_p)
    inputs[m], masks[m] = new_x, new_mask
    presence = presence.at[:, j].set(new_p)
  return dict(batch, inputs=inputs, masks=masks, presence=presence)


def _delta_hook(delta: jax.Array, target: jax.Array, detach: bool,
                embeddings: jax.Array | None = None):
  """``embedding_hook`` adding ``delta`` to the target modality's embedding
  (with ``detach``, every embedding under ``stop_gradient``, as the authors'
  attacked copy is built on detached input embeddings). With ``embeddings``
  (detached only) the perturbed embeddings are those, not this pass's: the
  pass's encoders are then unused, and XLA drops them."""
  mask = target[..., None].astype(delta.dtype)

  def hook(z, present):
    if embeddings is not None:
      z = embeddings
    base = jax.lax.stop_gradient(z) if detach else z
    return base + delta * mask, present
  return hook


def pgd_delta(model: ModelFns, params, batch: dict, target: jax.Array, delta0: jax.Array,
              key: jax.Array, *, step_size: float, eps: float, steps: int,
              loss_scale: float = 1.0, axis_name: str | None = None,
              embeddings: jax.Array | None = None) -> jax.Array:
  """PGD on the target modality's embedding: ``steps`` steps of
  ``delta <- clip(delta + step_size * grad, -eps, eps)`` (raw gradient of
  ``loss_scale`` times the task loss, ascent) from ``delta0``, the model frozen
  (``stop_gradient`` on ``params``). Returns ``delta * target`` (``(B, M, k)``,
  zero outside the target modality), under ``stop_gradient``.

  ``embeddings`` (``(B, M, k)``, e.g. a clean pass's ``out["embeddings"]`` of
  ``batch``): the embeddings to attack, so that no step runs the encoders
  again (the same numbers when the encoders draw no dropout); None: each
  step's own encoder pass.

  Example:
    >>> d0 = jax.random.uniform(key, (b, m, k), minval=-eps, maxval=eps)
    >>> delta = pgd_delta(model, params, batch, onehot, d0, key, step_size=0.1,
    ...                   eps=1e-3, steps=2)
  """
  params = jax.lax.stop_gradient(params)
  mask = target[..., None].astype(delta0.dtype)

  def attacked_loss(delta, k):
    out = model.apply(params, batch, k, hook=_delta_hook(delta, target, True, embeddings),
                      axis_name=axis_name)
    return loss_scale * model.task_loss(out["outputs"], batch["labels"])

  def body(i, delta):
    g = jax.grad(attacked_loss)(delta, jax.random.fold_in(key, i))
    return jnp.clip(delta + step_size * g, -eps, eps)

  delta = jax.lax.fori_loop(0, steps, body, jnp.clip(delta0, -eps, eps))
  return jax.lax.stop_gradient(delta * mask)


# ------------------------------------------------------------------ method ----

def _concat(a: dict, b: dict) -> dict:
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


def consistency(model: ModelFns, settings: Settings = Settings(),
                reconstruction_weight: float = 1.0) -> Method:
  """Consistency regularisation with heuristic and PGD perturbations.

  Args:
    model: the model as pure functions.
    settings: :class:`Settings`.
    reconstruction_weight: ``mu``, the generator's loss weight.

  Returns:
    A :class:`~modalimmune_jax.methods.base.Method` (no state).

  Example:
    >>> method = consistency(model_fns, Settings(heuristics=("swap",), weight=0.1))
  """
  s = settings
  names, m = model.names, len(model.names)
  bad = [h for h in s.heuristics if h not in HEURISTICS]
  if bad:
    raise ValueError(f"unknown heuristics {bad}; use a subset of {HEURISTICS}")
  if s.divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {s.divergence!r}")
  unknown = [t for t in s.targets if t not in names]
  if unknown:
    raise ValueError(f"unknown target modalities {unknown}; the model has {names}")
  if s.pgd_steps < 0 or s.pgd_eps < 0 or s.temperature <= 0:
    raise ValueError("need pgd_steps >= 0, pgd_eps >= 0 and temperature > 0")
  allowed = jnp.array([not s.targets or n in s.targets for n in names])
  heuristics = tuple(s.heuristics)
  adversarial = s.pgd_steps > 0

  def loss(params, state, batch, rng, axis_name=None):
    k_target, k_heur, k_delta, k_attack, k_clean, k_pgd = jax.random.split(rng, 6)
    b = batch["presence"].shape[0]
    n = global_batch_size(batch, axis_name)
    u = local_rows(jax.random.uniform(k_target, (n,)), axis_name)
    target = choose_targets(u, batch["presence"], allowed)
    rows, targets = batch, target
    if heuristics:
      copy = heuristic_copy(batch, target, k_heur, names, heuristics, s.noise_std, axis_name)
      rows, targets = _concat(batch, copy), jnp.concatenate([target, target])

    clean = model.apply(params, rows, k_clean, axis_name=axis_name)
    clean_loss = model.task_loss(clean["outputs"], rows["labels"])
    head = {k: v[:b] for k, v in clean.items() if k in ("outputs", "embeddings",
                                                         "reconstructions")}
    recon = reconstruction_loss(head, batch["presence"], axis_name)
    reference = jax.lax.stop_gradient(head["outputs"])
    copies = [clean["outputs"][b:]] if heuristics else []
    total = clean_loss + reconstruction_weight * recon
    metrics = {"task_loss": model.task_loss(head["outputs"], batch["labels"]),
               "recon_loss": recon, "clean_loss": clean_loss}

    if adversarial:
      k = clean["embeddings"].shape[-1]
      shape = (n, m, k)
      parts = [local_rows(jax.random.uniform(jax.random.fold_in(k_delta, i), shape,
                                             minval=-s.pgd_eps, maxval=s.pgd_eps), axis_name)
               for i in range(1 + bool(heuristics))]
      delta0 = jnp.concatenate(parts).astype(clean["embeddings"].dtype)
      # the gradient of the global-batch mean, whatever the number of devices
      scale = 1.0 if axis_name is None else 1.0 / jax.lax.axis_size(axis_name)
      # the attack perturbs the clean pass's embeddings of the rows (detached), as
      # the authors' perturbs the input embeddings: the encoders run once
      embeddings = jax.lax.stop_gradient(clean["embeddings"])
      delta = pgd_delta(model, params, rows, targets, delta0, k_attack,
                        step_size=s.pgd_step_size, eps=s.pgd_eps, steps=s.pgd_steps,
                        loss_scale=scale, axis_name=axis_name, embeddings=embeddings)
      hook = _delta_hook(delta, targets, s.pgd_detach, embeddings if s.pgd_detach else None)
      attacked = model.apply(params, rows, k_pgd, hook=hook, axis_name=axis_name)
      pgd_loss = model.task_loss(attacked["outputs"], rows["labels"])
      total = total + pgd_loss
      copies += [attacked["outputs"][:b]] + ([attacked["outputs"][b:]] if heuristics else [])
      metrics["pgd_loss"] = pgd_loss
      metrics["pgd_gain"] = pgd_loss - clean_loss

    if copies:
      d = jnp.mean(jnp.stack([jnp.mean(divergence(model.task, s.divergence, c, reference,
                                                  s.temperature)) for c in copies]))
      total = total + s.weight * d
      metrics["consistency"] = d
    return total, 0.0, metrics

  return Method("consistency", init=lambda params: (), loss=loss)


def from_config(s: Settings, config, model: ModelFns, dataset) -> Method:
  unknown = [t for t in s.targets if t not in model.names]
  if unknown:
    raise ConfigError(f"config key 'method.consistency.targets' names {unknown}, not "
                      f"modalities of the data set {model.names}")
  return consistency(model, s, config.method.reconstruction_weight)


SPEC = MethodSpec(
    "consistency", from_config, Settings,
    # the authors' defaults (w 0.01, eps 1e-3 on LLM token embeddings) and two larger
    # scales for our layer-normalised encoder outputs
    search=({"method.consistency.weight": 0.01, "method.consistency.pgd_eps": 1e-3},
            {"method.consistency.weight": 0.1, "method.consistency.pgd_eps": 1e-2},
            {"method.consistency.weight": 1.0, "method.consistency.pgd_eps": 0.1}))
