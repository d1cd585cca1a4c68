"""The multimodal model (``flax.nnx``).

One encoder per modality maps ``(B, L_m, d_m)`` frames with their mask to a
pooled embedding ``z_m`` in ``R^k``: a small pre-norm transformer with masked
attention and masked mean pooling for sequences (``L_m > 1``), an MLP for
vectors (``L_m = 1``). A fusion transformer runs over the ``M`` modality tokens
and a head maps the mean of the available tokens to the task's outputs:

* regression: ``(B,)``; classification: ``(B, C)`` logits;
* multi-label (IEMOCAP): ``(B, C, 2)`` logits (MulT's layout).

Optional parts, switched by the model config (ModalImmune, part 2):

* **property vectors**: one learned vector per modality, added to its token and
  substituted for it when the modality is missing;
* **reconstruction generator**: a head per modality that predicts ``z_m`` from
  the mean of the other present modalities' embeddings; a missing modality's
  token is filled with its reconstruction.

A missing modality (``presence`` False) never reaches the fusion through its
encoder: its token is the property vector and/or reconstruction, or, with
neither, it is masked out of the fusion attention and the mean.

``embedding_hook(z, presence) -> (z, presence)`` lets a method intervene on the
per-modality embeddings between the encoders and the fusion (ModalImmune's
destructive intervention plugs in there).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["MultimodalModel", "masked_mean", "self_attention"]


def masked_mean(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """Mean of ``x`` over ``axis`` where ``mask``; 0 where nothing is masked in."""
  m = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * m, axis) / jnp.maximum(jnp.sum(m, axis), 1.0)


def self_attention(attn: nnx.MultiHeadAttention, x: jax.Array,
                   key_mask: jax.Array | None) -> jax.Array:
  """``attn(x, mask=key_mask[:, None, None, :])`` with ``attn``'s parameters,
  computed with fewer passes over the ``(B, H, L, L)`` logits.

  ``key_mask`` ``(B, L)`` (False: a key no query attends to) or None (every
  key); ``attn`` as the blocks make it (biases, no qk normalisation, no
  attention dropout; anything else raises ValueError). The function is that
  of flax's multi-head attention (which calls ``jax.nn.dot_product_attention``):
  a masked logit is set to ``-0.7 * float32 max``, so a row without any key
  is uniform; the result agrees with it to float32 rounding
  (``tests/test_model_speed_equivalence.py``). What differs is the
  formulation; with it the MOSI-shaped training step takes about 0.53x the
  time on a 2-core CPU (``experiments/profile_step.py --old``):

  * one projection to ``q, k, v`` (the three kernels concatenated at run
    time; the parameters keep their names and shapes);
  * the scale ``1 / sqrt(d)`` applied to ``q`` ``(L, d)``, not to the logits
    ``(L, L)`` (the same numbers when ``d`` is a power of 4);
  * the key mask as an additive ``(B, 1, 1, L)`` bias, so no select over
    the logits forward or backward (``-0.7 max + logit`` rounds to ``-0.7
    max``; ``q`` is zeroed for a sample without any key, so that its logits
    carry no gradient, as under flax's select);
  * the softmax normalised after the value product, ``(e @ v) / sum(e)``
    with ``e = exp(logits - max)``: no ``(L, L)`` division forward and no
    ``(L, L)`` reduction backward.
  """
  if attn.normalize_qk or attn.dropout_rate > 0 or not attn.use_bias:
    raise ValueError("self_attention: only attention with biases, without qk normalisation "
                     "and without attention dropout (the model's blocks)")
  kernel = jnp.concatenate([attn.query.kernel[...], attn.key.kernel[...],
                            attn.value.kernel[...]], axis=1)  # (k, 3H, d)
  bias = jnp.concatenate([attn.query.bias[...], attn.key.bias[...], attn.value.bias[...]])
  qkv = jnp.einsum("bld,dhk->blhk", x, kernel) + bias
  scale = jnp.asarray(1.0 / attn.head_dim ** 0.5, qkv.dtype)
  if key_mask is not None:
    # a sample without any key: q = 0, so its logits are exactly the mask
    # (uniform weights) and, as with flax's select, carry no gradient to q, k
    scale = scale * jnp.any(key_mask, axis=1).astype(qkv.dtype)[:, None, None, None]
  q, k, v = jnp.split(qkv, 3, axis=2)
  q = q * scale
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)  # softmax in float32 at least
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=logits_dtype)
  if key_mask is not None:
    big = min(float(jnp.finfo(logits_dtype).max), float(jnp.finfo(jnp.float32).max))
    logits = logits + jnp.where(key_mask, 0.0, -0.7 * big).astype(logits_dtype)[:, None, None, :]
  e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  total = jnp.sum(e, axis=-1)  # (B, H, L)
  out = jnp.einsum("bhqk,bkhd->bqhd", e.astype(v.dtype), v)
  out = (out / jnp.swapaxes(total, 1, 2)[..., None]).astype(v.dtype)
  return attn.out(out)


class Block(nnx.Module):
  """Pre-norm transformer block with a key mask (``None``: every key)."""

  def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    # the attention's own dropout stays 0: ``self_attention`` has none
    self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_ratio * dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * dim, dim, rngs=rngs)
    self.drop = nnx.Dropout(dropout)

  def __call__(self, x, key_mask, *, train: bool, rngs):
    h = self_attention(self.attn, self.norm1(x), key_mask)
    x = x + self.drop(h, deterministic=not train, rngs=rngs)
    h = self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))
    return x + self.drop(h, deterministic=not train, rngs=rngs)


class Encoder(nnx.Module):
  """Frames ``(B, L, d)`` + mask ``(B, L)`` -> pooled embedding ``(B, k)``."""

  def __init__(self, length: int, width: int, dim: int, layers: int, heads: int,
               mlp_ratio: int, dropout: float, *, rngs: nnx.Rngs):
    self.sequence = length > 1
    self.proj = nnx.Linear(width, dim, rngs=rngs)
    if self.sequence:
      self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (length, dim)))
      self.blocks = nnx.List([Block(dim, heads, mlp_ratio, dropout, rngs=rngs)
                              for _ in range(layers)])
    else:
      self.hidden = nnx.Linear(dim, dim, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, x, mask, *, train: bool, rngs):
    h = self.proj(x)
    if self.sequence:
      h = h + self.pos[...]
      for block in self.blocks:
        h = block(h, mask, train=train, rngs=rngs)
      pooled = masked_mean(h, mask, axis=1)
    else:
      pooled = h[:, 0] + self.hidden(jax.nn.gelu(h[:, 0]))
    return self.norm(pooled)


class Reconstructor(nnx.Module):
  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, dim, rngs=rngs)
    self.fc2 = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x)))


class MultimodalModel(nnx.Module):
  """Per-modality encoders, token fusion, task head.

  Args:
    shapes: modality -> ``(L_m, d_m)``, in modality order.
    task: ``"regression"``, ``"classification"`` or ``"multilabel"``.
    num_outputs: 1, number of classes, or number of labels.
    hidden: embedding width ``k``.
    encoder_layers, fusion_layers, num_heads, mlp_ratio, dropout: sizes.
    property_vectors, reconstruction: the optional ModalImmune parts.
    rngs: ``nnx.Rngs`` for the initialisation.

  Example:
    >>> model = MultimodalModel({"text": (50, 300), "audio": (1, 74)},
    ...                         "classification", 4, rngs=nnx.Rngs(0))
    >>> out = model(batch["inputs"], batch["masks"], batch["presence"])
    >>> out["outputs"].shape, out["embeddings"].shape   # (B, 4), (B, 2, 64)
  """

  def __init__(self, shapes: Mapping[str, tuple[int, int]], task: str, num_outputs: int,
               *, hidden: int = 64, encoder_layers: int = 1, fusion_layers: int = 1,
               num_heads: int = 4, mlp_ratio: int = 2, dropout: float = 0.0,
               property_vectors: bool = False, reconstruction: bool = False,
               rngs: nnx.Rngs):
    if task not in ("regression", "classification", "multilabel"):
      raise ValueError(f"unknown task {task!r}")
    if hidden % num_heads:
      raise ValueError(f"hidden ({hidden}) must be divisible by num_heads ({num_heads})")
    self.names = tuple(shapes)
    self.task, self.num_outputs = task, num_outputs
    self.encoders = nnx.Dict({
        m: Encoder(int(l), int(d), hidden, encoder_layers, num_heads, mlp_ratio, dropout,
                   rngs=rngs) for m, (l, d) in shapes.items()})
    num = len(self.names)
    self.modality_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num, hidden)))
    self.use_property = property_vectors
    if property_vectors:
      self.property = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num, hidden)))
    self.use_reconstruction = reconstruction
    if reconstruction:
      self.reconstructors = nnx.Dict({m: Reconstructor(hidden, rngs=rngs) for m in self.names})
    self.fusion = nnx.List([Block(hidden, num_heads, mlp_ratio, dropout, rngs=rngs)
                            for _ in range(fusion_layers)])
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)
    out = num_outputs * 2 if task == "multilabel" else num_outputs
    self.head = nnx.Linear(hidden, out, rngs=rngs)

  def __call__(self, inputs: Mapping[str, jax.Array], masks: Mapping[str, jax.Array],
               presence: jax.Array, *, train: bool = False, rngs: Any = None,
               embedding_hook: Callable | None = None) -> dict[str, jax.Array]:
    """Returns ``outputs``, ``embeddings`` ``(B, M, k)`` (the encoders' output,
    before ``embedding_hook``), ``fused``, ``presence`` (after the hook) and,
    with the generator, ``reconstructions`` (from the hooked embeddings)."""
    missing = [m for m in self.names if m not in inputs]
    if missing:
      raise KeyError(f"batch lacks modalities {missing}; model has {self.names}")
    z = jnp.stack([self.encoders[m](inputs[m], masks[m], train=train, rngs=rngs)
                   for m in self.names], axis=1)
    present = presence.astype(bool)
    result = {"embeddings": z}  # what the encoders produced, before any intervention
    if embedding_hook is not None:
      z, present = embedding_hook(z, present)
    tokens = jnp.where(present[..., None], z, 0.0)
    fill = jnp.zeros_like(z)
    if self.use_reconstruction:
      # context for m: mean of the other present modalities' embeddings
      others = present[:, None, :] & ~jnp.eye(len(self.names), dtype=bool)[None]
      context = jnp.einsum("bmj,bjk->bmk", others.astype(z.dtype), z) / jnp.maximum(
          others.sum(-1, keepdims=True), 1).astype(z.dtype)
      recon = jnp.stack([self.reconstructors[m](context[:, j])
                         for j, m in enumerate(self.names)], axis=1)
      result["reconstructions"] = recon
      fill = fill + recon
    if self.use_property:
      prop = jnp.broadcast_to(self.property[...][None], z.shape)
      tokens = tokens + jnp.where(present[..., None], prop, 0.0)
      fill = fill + prop
    filled = self.use_property or self.use_reconstruction
    tokens = jnp.where(present[..., None], tokens, fill) + self.modality_embed[...][None]
    available = jnp.ones_like(present) if filled else present
    for block in self.fusion:  # every token is available when filled: no mask
      tokens = block(tokens, None if filled else available, train=train, rngs=rngs)
    fused = self.norm(masked_mean(tokens, available, axis=1))
    out = self.head(fused)
    if self.task == "regression":
      out = out[:, 0]
    elif self.task == "multilabel":
      out = out.reshape(out.shape[0], self.num_outputs, 2)
    result.update(outputs=out, fused=fused, presence=present)
    return result
