"""Explicit basis reallocation (Chaudhuri et al., ICML 2025, arXiv 2505.22483).

A REIMPLEMENTATION: the authors released no code. What is known is in
``../shared/BASELINES.md`` ("Explicit basis reallocation"; the paper's
Sec. 3.4, 4.4, App. C.1, C.7 as read by a removed third-party
reimplementation). Carried to our model through its ``embedding_hook``:

* per modality an encoder ``h_m: z_m -> g_m`` into a shared space (MLP
  ``k -> hidden -> shared_dim``) and a decoder ``h_m^-1: g_m -> f_m`` back
  (``shared_dim -> hidden -> k``); the fusion consumes the decoded ``f_m``
  in place of the encoder output ``z_m``;
* a modality classifier on ``g`` (``shared_dim -> hidden -> M``), weight
  ``adversarial_weight``: the classifier minimises the cross-entropy of the
  modality id over the present (sample, modality) cells, and everything
  before it (``h_m`` and the model's encoders) works against it, so the shared
  space becomes modality-indistinguishable. ``adversarial="reversal"`` (the
  paper): through a gradient-reversal layer (coefficient ``reversal``), the
  encoders maximise the same cross-entropy. ``"confusion"`` (ours): the
  encoders minimise the cross-entropy to the uniform distribution over
  modalities (Tzeng et al. 2015's domain confusion), which does not saturate
  when the classifier is confident, as the reversed cross-entropy does;
* ``cross_weight`` (ours, default 1; 0 = the paper as read): a cross-reconstruction term
  that trains the fill on complete training pairs, ``mean ||h_m^-1(g_j) -
  sg(h_m^-1(g_m))||^2 / k`` over present cells ``m`` with ``j`` drawn
  uniformly among the sample's other present modalities (an unbiased estimate
  of the mean over all pairs, at the cost of one decoding);
* ``dropout_rate`` (ours; 0 = off): modality dropout on the training batch
  (independent per cell, at least one kept), so the fill also runs in
  training and the task loss trains it through the fusion;
* a missing modality ``m`` is filled with ``h_m^-1(g_j)``, ``j`` the available
  modality ranked most similar to ``m``: the mean cosine similarity of
  ``g_m`` and ``g_j`` over training pairs where both are present (an
  exponential moving average over training batches, ``similarity_decay``),
  and the filled cell counts as present for the fusion. The same fill runs
  in training (when a training batch lacks a modality) and at evaluation
  (:attr:`Method.predict_hook`).

Why the additions (``docs/method.md``, "Why the cross term"): as
read from the paper, with complete training batches nothing trains the fill
(the decoders only ever see their own modality), and the reversed classifier
wins outright (its cross-entropy falls to ~1e-4, against ``log M`` when
confused), so the fill decodes an unrelated vector and scores below no fill
at all.

How the extra parameters fit the plug-in (the step differentiates only the
model's parameters): the EBR networks ``nets`` live in the method state with
their own optimiser state (the model's optimiser,
:func:`~modalimmune_jax.build.make_optimizer`, so the same schedule, clipping and
weight decay). The model's parameters are
trained by the step on the full objective (the nets constant); ``update``
then takes the gradient of the same objective (same batch, same key) with
respect to the nets at the updated model parameters and applies it: an
alternating (block Gauss-Seidel) form of joint training, one extra forward
pass and a backward pass through fusion, head and nets per step. Inside
``shard_map`` the nets' objective is ``pmean``-ed before differentiation,
exactly like the step's own objective, so N devices compute the global-batch
mean gradient; the similarity sums and pair counts are ``psum``-ed.

Example:
  >>> method = ebr(model_fns, Settings(shared_dim=32, hidden=64), optax.adam(1e-3))
  >>> state = method.init(params)
  >>> hook = method.predict_hook(params, state)   # the test-time fill
"""

from __future__ import annotations

from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from modalimmune_jax import build
from modalimmune_jax.methods.base import (Method, MethodSpec, ModelFns, cell_mean,
                                          global_batch_size, local_rows, reconstruction_loss)
from modalimmune_jax.methods.dropout import drop_modalities
from modalimmune_jax.schema import Key

__all__ = ["Settings", "EBRState", "ADVERSARIAL", "reverse_gradient", "init_nets", "encode",
           "decode", "classify", "fill_sources", "ebr_hook", "adversarial_loss",
           "confusion_loss", "cross_loss", "pair_similarity", "ebr", "widths", "SPEC"]

ADVERSARIAL = ("reversal", "confusion")
WIDTH_FACTOR = 4.0  # chosen on mfeat's valid split: experiments/results/ebr_widths


class Settings(NamedTuple):
  """``config.method.ebr``; sources in ``docs/method.md``."""
  shared_dim: Annotated[int, Key(
      "reimpl.: MLP `d -> 1024 -> 512` after the paper's App. C.1, used with `width_factor` "
      "0; our `d` is `model.hidden` (64), narrower than the paper's features, so the shared "
      "space is wider than the embedding", within="(0, inf)")] = 512
  hidden: Annotated[int, Key(
      "reimpl.: hidden width of encoders, decoders and the modality classifier (with "
      "`width_factor` 0)", within="(0, inf)")] = 1024
  adversarial_weight: Annotated[float, Key(
      "reimpl.: modality-classifier CE weight 0.01, the paper sweeps [1e-3, 1]; tuned over "
      "that range", within="[0, inf)")] = 0.01
  reversal: Annotated[float, Key(
      "reimpl.: gradient-reversal coefficient", within="[0, inf)")] = 1.0
  similarity_decay: Annotated[float, Key(
      "ours: EMA of the per-batch mean cosine similarity that ranks the fill's source (the "
      "paper ranks on training pairs; when and how is not known)", within="[0, 1)")] = 0.99
  adversarial: Annotated[str, Key(
      "reimpl.: the paper's gradient reversal; `\"confusion\"` (ours, Tzeng et al. 2015: the "
      "encoders minimise the cross-entropy to uniform) does not saturate, but scored no "
      "better on mfeat's valid split", choices=ADVERSARIAL)] = "reversal"
  cross_weight: Annotated[float, Key(
      "ours: the cross-reconstruction (squared error of `h_m^-1(g_j)` to the stopped "
      "`h_m^-1(g_m)`) that trains the fill on complete pairs; nothing in the paper as read "
      "trains it (0 = as read: mfeat valid selection score 0.71 against 0.95 with it)",
      within="[0, inf)")] = 1.0
  dropout_rate: Annotated[float, Key(
      "ours: modality dropout on the training batch, so the fill also runs in training (0 = "
      "off, as the paper as read)", within="[0, 1)")] = 0.0
  width_factor: Annotated[float, Key(
      "ours (departure): the networks' widths relative to the embedding width `k` "
      "(`model.hidden`) at the paper's ratio, shared `factor * k` and hidden `2 * factor * k` "
      "(`shared_dim`, `hidden` then unused; 0 = those absolute widths); the paper's 512 / "
      "1024 are 8x / 16x our 64-wide embeddings. Chosen on mfeat's valid split "
      "(`experiments/ebr_widths.py`, one seed: selection score 93.34, 93.88, 94.22, 93.97 at "
      "factors 1, 2, 4, 8)", within="[0, inf)")] = WIDTH_FACTOR


class EBRState(NamedTuple):
  """The method state: the EBR networks, their optimiser state, the ranking.

  Attributes:
    nets: ``{"enc": [..M], "dec": [..M], "cls": ...}``, each an MLP
      ``[(W1, b1), (W2, b2)]`` (in the modality order).
    opt_state: the nets' optimiser state.
    similarity: ``(M, M)`` mean cosine similarity of ``g`` over training pairs.
    seen: ``(M, M)`` 1 once a pair was seen (the EMA starts at its first value).
  """
  nets: Any
  opt_state: Any
  similarity: jax.Array
  seen: jax.Array


# -------------------------------------------------------- gradient reversal ----

@jax.custom_vjp
def _reverse(x, coeff):
  return x


def _reverse_fwd(x, coeff):
  return x, coeff


def _reverse_bwd(coeff, g):
  return (-coeff * g, jnp.zeros_like(coeff))


_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def reverse_gradient(x: jax.Array, coeff: float = 1.0) -> jax.Array:
  """Identity forward; the backward pass multiplies the cotangent by ``-coeff``
  (Ganin & Lempitsky's gradient-reversal layer)."""
  return _reverse(x, jnp.asarray(coeff, x.dtype))


# ---------------------------------------------------------------- networks ----

def _mlp_init(key, sizes, dtype=jnp.float32):
  layers = []
  for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    w = jax.random.normal(k, (a, b), dtype) * jnp.sqrt(1.0 / a).astype(dtype)  # LeCun normal
    layers.append((w, jnp.zeros((b,), dtype)))
  return layers


def _mlp(layers, x):
  for i, (w, b) in enumerate(layers):
    x = x @ w + b
    if i < len(layers) - 1:
      x = jax.nn.gelu(x)
  return x


def init_nets(key: jax.Array, num_modalities: int, width: int, shared_dim: int,
              hidden: int) -> dict:
  """Per-modality encoders ``width -> hidden -> shared_dim`` and decoders back,
  and the modality classifier ``shared_dim -> hidden -> M``."""
  k_enc, k_dec, k_cls = jax.random.split(key, 3)
  m = num_modalities
  return {
      "enc": [_mlp_init(k, (width, hidden, shared_dim)) for k in jax.random.split(k_enc, m)],
      "dec": [_mlp_init(k, (shared_dim, hidden, width)) for k in jax.random.split(k_dec, m)],
      "cls": _mlp_init(k_cls, (shared_dim, hidden, m)),
  }


def encode(nets: dict, z: jax.Array) -> jax.Array:
  """``g = (h_m(z_m))_m``: ``(B, M, k) -> (B, M, shared_dim)``."""
  return jnp.stack([_mlp(e, z[:, j]) for j, e in enumerate(nets["enc"])], axis=1)


def decode(nets: dict, g: jax.Array) -> jax.Array:
  """``(h_m^-1(g[:, m]))_m``: the decoder of column ``m`` applied to column ``m``."""
  return jnp.stack([_mlp(d, g[:, j]) for j, d in enumerate(nets["dec"])], axis=1)


def classify(nets: dict, g: jax.Array) -> jax.Array:
  """Modality logits ``(B, M, M)`` of every shared-space vector."""
  return _mlp(nets["cls"], g)


def fill_sources(similarity: jax.Array, available: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For each (sample, modality m): the available modality ``j != m`` with the
  largest ``similarity[m, j]`` (ties: the first), and whether there is one.

  ``similarity``: ``(M, M)``, or ``(B, M, M)`` for a score per sample.
  Returns ``(source (B, M) int32, has_source (B, M) bool)``.
  """
  b, m = available.shape
  candidates = available[:, None, :] & ~jnp.eye(m, dtype=bool)[None]
  score = jnp.where(candidates, jnp.broadcast_to(similarity, (b, m, m)).astype(jnp.float32),
                    -jnp.inf)
  return jnp.argmax(score, axis=-1).astype(jnp.int32), jnp.any(candidates, axis=-1)


def ebr_hook(nets: dict, similarity: jax.Array):
  """The ``embedding_hook``: present modalities become ``h_m^-1(h_m(z_m))``; a
  missing modality ``m`` becomes ``h_m^-1(g_j)`` with ``j`` from
  :func:`fill_sources` (and counts as present); a sample with nothing
  available keeps its cells as they were."""
  def hook(z, present):
    g = encode(nets, z)
    own = decode(nets, g)
    source, has = fill_sources(similarity, present)
    filled = _decode_from(nets, g, source)
    f = jnp.where(present[..., None], own, jnp.where(has[..., None], filled, z))
    return f.astype(z.dtype), present | has
  return hook


def _decode_from(nets: dict, g: jax.Array, source: jax.Array) -> jax.Array:
  """``h_m^-1(g[:, source[:, m]])`` for every column ``m``: ``(B, M, k)``."""
  return decode(nets, jnp.take_along_axis(g, source[..., None], axis=1))


def adversarial_loss(nets: dict, g: jax.Array, present: jax.Array,
                     reversal: float | None = 1.0, axis_name: str | None = None) -> jax.Array:
  """Mean modality-id cross-entropy over present cells of ``classify(R(g))``, ``R``
  the gradient reversal with coefficient ``reversal`` (None: no reversal);
  ``axis_name`` as in :func:`~modalimmune_jax.methods.base.cell_mean`."""
  m = g.shape[1]
  if reversal is not None:
    g = reverse_gradient(g, reversal)
  logits = classify(nets, g)
  labels = jnp.broadcast_to(jnp.arange(m), logits.shape[:2])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return cell_mean(ce, present, axis_name)


def confusion_loss(nets: dict, g: jax.Array, present: jax.Array,
                   axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Domain confusion (Tzeng et al. 2015) in place of gradient reversal.

  Returns ``(objective, classifier_ce)``. ``objective`` is the sum of the
  classifier's cross-entropy on ``sg(g)`` (its gradient reaches the
  classifier only) and the cross-entropy of the classifier's prediction on
  ``g`` to the uniform distribution over modalities, with the classifier held
  constant (its gradient reaches ``g`` only). ``classifier_ce`` is the first:
  ``log M`` when the shared space is modality-indistinguishable.
  """
  ce = adversarial_loss(nets, jax.lax.stop_gradient(g), present, None, axis_name)
  logits = classify(dict(nets, cls=jax.lax.stop_gradient(nets["cls"])), g)
  uniform = -jnp.mean(jax.nn.log_softmax(logits, axis=-1), axis=-1)  # CE to 1/M each
  confusion = cell_mean(uniform, present, axis_name)
  return ce + confusion, ce


def cross_loss(nets: dict, g: jax.Array, present: jax.Array, scores: jax.Array,
               axis_name: str | None = None) -> jax.Array:
  """The fill's training signal on complete pairs (ours): the mean over
  present cells ``(b, m)`` that have another present modality of
  ``||h_m^-1(g_j) - sg(h_m^-1(g_m))||^2 / k``, ``j`` the sample's other
  present modality with the largest ``scores[b, m, j]`` (uniform draws: ``j``
  uniform among them)."""
  source, has = fill_sources(scores, present)
  own = jax.lax.stop_gradient(decode(nets, g))
  err = jnp.mean((_decode_from(nets, g, source) - own) ** 2, axis=-1)
  return cell_mean(err, present & has, axis_name)


def pair_similarity(g: jax.Array, present: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(sums, counts)``, each ``(M, M)``: the sum of ``cos(g_m, g_j)`` over the
  samples where both ``m`` and ``j`` are present, and their number."""
  unit = g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-8)
  cos = jnp.einsum("bms,bjs->bmj", unit, unit)
  both = (present[:, :, None] & present[:, None, :]).astype(g.dtype)
  return jnp.sum(cos * both, 0), jnp.sum(both, 0)


# ------------------------------------------------------------------ method ----

def ebr(model: ModelFns, settings: Settings = Settings(),
        optimizer: optax.GradientTransformation | None = None,
        width: int | None = None, seed: int = 0,
        reconstruction_weight: float = 1.0) -> Method:
  """Explicit basis reallocation (reimplementation).

  Args:
    model: the model as pure functions.
    settings: :class:`Settings`.
    reconstruction_weight: ``mu``, the generator's loss weight.
    optimizer: the nets' optax optimiser (default ``optax.adamw(1e-3)``).
    width: the embedding width ``k`` (default: read from the parameters).
    seed: the nets' initialisation seed.
  """
  s = settings
  if s.adversarial not in ADVERSARIAL:
    raise ValueError(f"adversarial must be one of {ADVERSARIAL}, got {s.adversarial!r}")
  m = len(model.names)
  tx = optimizer if optimizer is not None else optax.adamw(1e-3)

  def objective(params, nets, similarity, batch, rng, axis_name):
    k_drop, k_cross, k_model = jax.random.split(rng, 3)
    if s.dropout_rate > 0:
      batch = drop_modalities(batch, k_drop, model.names, s.dropout_rate, axis_name)
    present = batch["presence"].astype(bool)
    out = model.apply(params, batch, k_model, hook=ebr_hook(nets, similarity),
                      axis_name=axis_name)
    task = model.task_loss(out["outputs"], batch["labels"])
    recon = reconstruction_loss(out, present, axis_name)
    g = encode(nets, out["embeddings"])
    if s.adversarial == "reversal":
      adv = classifier_ce = adversarial_loss(nets, g, present, s.reversal, axis_name)
    else:
      adv, classifier_ce = confusion_loss(nets, g, present, axis_name)
    total = task + reconstruction_weight * recon + s.adversarial_weight * adv
    metrics = {"task_loss": task, "recon_loss": recon, "ebr_adversarial": classifier_ce}
    if s.cross_weight > 0:
      n_global = global_batch_size(batch, axis_name)
      scores = local_rows(jax.random.uniform(k_cross, (n_global, m, m)), axis_name)
      cross = cross_loss(nets, g, present, scores, axis_name)
      total = total + s.cross_weight * cross
      metrics["ebr_cross"] = cross
    return total, metrics, (g, present)

  def init(params):
    k = width
    if k is None:
      k = jax.tree.leaves(params["modality_embed"])[0].shape[-1]
    nets = init_nets(jax.random.key(seed), m, k, s.shared_dim, s.hidden)
    return EBRState(nets, tx.init(nets), jnp.zeros((m, m), jnp.float32),
                    jnp.zeros((m, m), jnp.float32))

  def loss(params, state, batch, rng, axis_name=None):
    total, metrics, _ = objective(params, state.nets, state.similarity, batch, rng, axis_name)
    return total, 0.0, metrics

  def update(state, params, batch, rng, step, axis_name=None):
    frozen = jax.lax.stop_gradient(params)

    def nets_objective(nets):
      total, _, g = objective(frozen, nets, state.similarity, batch, rng, axis_name)
      if axis_name is not None:
        total = jax.lax.pmean(total, axis_name)
      return total, g

    (value, (g, present)), grads = jax.value_and_grad(nets_objective, has_aux=True)(state.nets)
    updates, opt_state = tx.update(grads, state.opt_state, state.nets)
    nets = optax.apply_updates(state.nets, updates)
    sums, counts = pair_similarity(jax.lax.stop_gradient(g), present)
    if axis_name is not None:
      sums, counts = jax.lax.psum((sums, counts), axis_name)
    batch_mean = sums / jnp.maximum(counts, 1.0)
    decay = s.similarity_decay
    ema = jnp.where(state.seen > 0, decay * state.similarity + (1 - decay) * batch_mean,
                    batch_mean)
    similarity = jnp.where(counts > 0, ema, state.similarity)
    seen = jnp.maximum(state.seen, (counts > 0).astype(state.seen.dtype))
    off = ~jnp.eye(m, dtype=bool)
    metrics = {"ebr_nets_loss": value,
               "ebr_mean_similarity": jnp.sum(jnp.where(off, similarity, 0.0))
               / max(m * (m - 1), 1)}
    return EBRState(nets, opt_state, similarity, seen), metrics

  def predict_hook(params, state):
    return ebr_hook(state.nets, state.similarity)

  return Method("ebr", init=init, loss=loss, update=update, predict_hook=predict_hook)


def widths(s: Settings, k: int) -> tuple[int, int]:
  """``(shared_dim, hidden)`` of the networks for embeddings of width ``k``."""
  if not s.width_factor:
    return s.shared_dim, s.hidden
  shared = max(1, round(s.width_factor * k))
  return shared, 2 * shared


def from_config(s: Settings, config, model: ModelFns, dataset) -> Method:
  shared, hidden = widths(s, config.model.hidden)
  s = s._replace(shared_dim=shared, hidden=hidden)
  # the nets train with the model's optimiser: the same schedule, clipping and decay
  return ebr(model, s, build.make_optimizer(config), width=config.model.hidden,
             seed=config.seed + 1, reconstruction_weight=config.method.reconstruction_weight)


SPEC = MethodSpec(
    "ebr", from_config, Settings, label="reimpl., no official code",
    about="Reimplementation, no official code.",
    # its adversarial weight over the paper's sweep
    search=tuple({"method.ebr.adversarial_weight": w} for w in (0.01, 0.1, 1.0)))
