"""Per-modality scores of balanced multimodal learning (OPM, OGM-GE): one place
per primitive.

Wei et al., "On-the-fly Modulation for Balanced Multimodal Learning" (TPAMI
2024, arXiv 2410.11582; OGM-GE, CVPR 2022) detect the modality the model leans
on from a per-batch score of each modality, ``score_m = sum over the batch of
softmax(logits_m)[label]``, detached, no EMA. Their code reads ``logits_m`` off
the concat head: the head's weight half of modality ``m`` times its features,
plus half the bias (GeWu-Lab/OGM-GE_CVPR2022 ``main.py:88-93, 105-106``;
GeWu-Lab/BML_TPAMI2024 ``code/models/Classifier.py:112-143``). Our fusion is a
transformer over modality tokens, with no head to split, so we use **our
analogue of the split, the zeroed-others one** (the maintainer's advice for
other fusions, OGM-GE issue #21: set the other modalities' features to 0):

* ``logits_m``: the model's output with only ``m`` present, the other
  modalities removed as the protocol removes them
  (:func:`~modalimmune_jax.masking.remove_modalities`: the fusion fills or
  masks their tokens), under ``stop_gradient``, in training mode with the
  training pass's dropout key (so ``z_m`` is the very embedding the training
  pass fuses, as the code reads the training pass's features).
  :func:`unimodal_outputs` turns the presence bits off after the encoders
  (``embedding_hook``) rather than zeroing the inputs: a missing modality never
  reaches the fusion through its encoder, so the outputs are those of
  ``remove_modalities`` (tested), and the encoders run once for the ``M``
  patterns (``vmap`` batches only what depends on the pattern: the fusion).
* ``score_m = sum_i exp(-loss_i(m))`` with ``loss_i`` the sample's task loss
  (:func:`sample_scores`): for classification ``exp(-CE) = softmax(logits)[label]``,
  the code's score exactly; **for regression (MOSI-shaped data) our analogue**:
  ``exp(-|y - yhat_m|)`` under the L1 loss (the likelihood of the label under
  a unit Laplace, as softmax is under the categorical), ``exp(-(y - yhat_m)^2)``
  under MSE; for multi-label outputs ``exp(-mean over labels of the 2-way CE)``.
* Over the *global* batch: the local sums are ``psum``-ed over ``axis_name``
  inside ``shard_map``, so N devices compute the score of one.

Ratios (:func:`score_ratios`): with two modalities ``score_m / score_other``
(both papers' code); with three or more the field's generalisation is
GeWu-Lab/BalanceBenchmark's, which differs by method: ``"sum"`` (each score
against the sum of the others: ``balancemm/trainer/OPM_trainer.py:174-181``)
and ``"min"`` (against the smallest other score:
``balancemm/trainer/OGM_trainer.py:144-145``). Both equal the two-modality rule
for ``M = 2``.

Example:
  >>> scores = modality_scores(model_fns, params, batch, rng)      # (M,), detached
  >>> ratios = score_ratios(scores, "sum")                        # score_m / sum_{j!=m}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from modalimmune_jax.methods.base import ModelFns

__all__ = ["REFERENCES", "sample_scores", "unimodal_outputs", "modality_scores",
           "score_ratios"]

REFERENCES = ("sum", "min")
_TINY = 1e-12  # a floor for a ratio's denominator (an underflowed score)


def sample_scores(task: str, outputs: jax.Array, labels: jax.Array,
                  regression_loss: str = "l1") -> jax.Array:
  """``(B,)`` ``exp(-per-sample task loss)``: ``softmax(logits)[label]`` for
  classification, ``exp(-|err|)`` (L1) or ``exp(-err^2)`` (MSE) for regression,
  ``exp(-mean 2-way CE over labels)`` for multi-label outputs ``(B, C, 2)``.

  Example:
    >>> sample_scores("classification", jnp.zeros((2, 4)), jnp.array([0, 3]))  # 0.25 each
  """
  if task == "regression":
    err = outputs - labels
    loss = jnp.abs(err) if regression_loss == "l1" else err ** 2
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
    if loss.ndim > 1:  # multi-label: (B, C)
      loss = jnp.mean(loss, axis=tuple(range(1, loss.ndim)))
  return jnp.exp(-loss)


def unimodal_outputs(model: ModelFns, params, batch: dict, rng: jax.Array | None = None,
                     axis_name: str | None = None, *, train: bool = True) -> jax.Array:
  """``(M, B, ...)``: the model's outputs with only modality ``m`` present, for
  each ``m`` (the others removed: presence off after the encoders, which is
  what :func:`~modalimmune_jax.masking.remove_modalities` gives; module
  docstring). ``rng`` drives dropout as in ``model.apply``.

  Example:
    >>> out = unimodal_outputs(model_fns, params, batch, rng)   # out[0]: first modality alone
  """
  m = len(model.names)

  def alone(keep):
    hook = lambda z, present: (z, present & keep[None, :])
    return model.apply(params, batch, rng, train=train, hook=hook,
                       axis_name=axis_name)["outputs"]

  return jax.vmap(alone)(jnp.eye(m, dtype=bool))


def modality_scores(model: ModelFns, params, batch: dict, rng: jax.Array | None = None,
                    axis_name: str | None = None, *, train: bool = True) -> jax.Array:
  """``(M,)`` ``score_m = sum over the global batch of exp(-loss_i(m))``, detached
  (module docstring); inside ``shard_map`` the device sums are ``psum``-ed, so
  every device holds the global-batch scores.

  Example:
    >>> scores = modality_scores(model_fns, params, batch, rng, axis_name="data")
  """
  outputs = unimodal_outputs(model, jax.lax.stop_gradient(params), batch, rng, axis_name,
                             train=train)
  per_sample = jax.vmap(lambda o: sample_scores(model.task, o, batch["labels"],
                                                model.regression_loss))(outputs)
  total = jax.lax.stop_gradient(jnp.sum(per_sample, axis=1))
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def score_ratios(scores: jax.Array, reference: str = "sum") -> jax.Array:
  """``(M,)`` ``score_m / ref_m``: ``ref_m`` the sum of the other scores
  (``"sum"``) or the smallest other score (``"min"``); for two modalities
  both are ``score_m / score_other``.

  Example:
    >>> score_ratios(jnp.array([6.0, 2.0, 1.0]), "sum")   # [2, 2/7, 1/8]
    >>> score_ratios(jnp.array([6.0, 2.0, 1.0]), "min")   # [6, 2, 1/2]
  """
  if reference not in REFERENCES:
    raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
  m = scores.shape[0]
  if m < 2:
    raise ValueError("score ratios need at least two modalities")
  others = ~jnp.eye(m, dtype=bool)
  if reference == "sum":
    ref = jnp.sum(jnp.where(others, scores[None, :], 0.0), axis=1)
  else:
    ref = jnp.min(jnp.where(others, scores[None, :], jnp.inf), axis=1)
  return scores / jnp.maximum(ref, _TINY)
