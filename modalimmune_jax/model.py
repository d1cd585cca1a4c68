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

CMPT's parts (:mod:`modalimmune_jax.methods.cmpt`), off by default:

* **proxy tokens** (``proxy_tokens``): a missing modality's embedding is
  replaced, after ``embedding_hook``, by its cross-modal proxy
  (:class:`ProxyTokens`), read from the present modalities' frames;
* **LoRA** (``lora_rank`` > 0): the encoders' linear layers wrapped in
  :class:`LoRA` (``lora_targets``: every linear layer or the attention ones);
* **gated fusion** (``gated_fusion``): :class:`GatedFusion` instead of the
  masked mean of the fused tokens.

``embedding_hook(z, presence) -> (z, presence)`` lets a method intervene on the
per-modality embeddings between the encoders and the fusion (ModalImmune's
destructive intervention plugs in there).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["MultimodalModel", "masked_mean", "self_attention", "LoRA", "add_lora",
           "ProxyTokens", "GatedFusion"]


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

  def states(self, x, mask, *, train: bool, rngs):
    """Per-frame states before pooling: ``(B, L, k)``; ``(B, 1, k)`` for vectors."""
    h = self.proj(x)
    if self.sequence:
      h = h + self.pos[...]
      for block in self.blocks:
        h = block(h, mask, train=train, rngs=rngs)
      return h
    return (h[:, 0] + self.hidden(jax.nn.gelu(h[:, 0])))[:, None]

  def pool(self, h, mask):
    """The pooled embedding ``(B, k)`` of :meth:`states`."""
    return self.norm(masked_mean(h, mask, axis=1) if self.sequence else h[:, 0])

  def __call__(self, x, mask, *, train: bool, rngs):
    return self.pool(self.states(x, mask, train=train, rngs=rngs), mask)


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
    proxy_tokens, lora_rank, lora_targets, gated_fusion: CMPT's parts.
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
               proxy_tokens: bool = False, lora_rank: int = 0, lora_targets: str = "linear",
               gated_fusion: bool = False, rngs: nnx.Rngs):
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
    # CMPT's parts (methods/cmpt.py), off by default: other parameter trees unchanged
    self.use_proxy, self.use_gate = proxy_tokens, gated_fusion
    if lora_rank:
      for m in self.names:
        add_lora(self.encoders[m], lora_rank, lora_targets, rngs=rngs)
    if proxy_tokens:
      self.proxies = ProxyTokens(self.names, hidden, num_heads, rngs=rngs)
    if gated_fusion:
      self.gate = GatedFusion(num, hidden, rngs=rngs)

  def encode(self, inputs: Mapping[str, jax.Array], masks: Mapping[str, jax.Array], *,
             train: bool = False, rngs: Any = None) -> tuple[dict, jax.Array]:
    """The encoders alone: each modality's frame states and the embeddings
    ``(B, M, k)`` (what ``__call__`` returns as ``embeddings``, drawing the
    same dropout)."""
    missing = [m for m in self.names if m not in inputs]
    if missing:
      raise KeyError(f"batch lacks modalities {missing}; model has {self.names}")
    states = {m: self.encoders[m].states(inputs[m], masks[m], train=train, rngs=rngs)
              for m in self.names}
    z = jnp.stack([self.encoders[m].pool(states[m], masks[m]) for m in self.names], axis=1)
    return states, z

  def __call__(self, inputs: Mapping[str, jax.Array], masks: Mapping[str, jax.Array],
               presence: jax.Array, *, train: bool = False, rngs: Any = None,
               embedding_hook: Callable | None = None) -> dict[str, jax.Array]:
    """Returns ``outputs``, ``embeddings`` ``(B, M, k)`` (the encoders' output,
    before ``embedding_hook``), ``fused``, ``presence`` (after the hook) and,
    with the generator, ``reconstructions`` (from the hooked embeddings); with
    proxy tokens, ``proxy_pairs``, ``proxies`` and ``proxy_filled``
    (:meth:`ProxyTokens.substitute`)."""
    states, z = self.encode(inputs, masks, train=train, rngs=rngs)
    present = presence.astype(bool)
    result = {"embeddings": z}  # what the encoders produced, before any intervention
    if embedding_hook is not None:
      z, present = embedding_hook(z, present)
    result["presence"] = present
    if self.use_proxy:  # a missing modality's embedding is its proxy (CMPT)
      z, present, proxies = self.proxies.substitute(states, masks, z, present)
      result.update(proxies)
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
    fused = self.norm(self.gate(tokens, available) if self.use_gate
                      else masked_mean(tokens, available, axis=1))
    out = self.head(fused)
    if self.task == "regression":
      out = out[:, 0]
    elif self.task == "multilabel":
      out = out.reshape(out.shape[0], self.num_outputs, 2)
    result.update(outputs=out, fused=fused)
    return result


# ------------------------------------------- CMPT's parts (methods/cmpt.py) ----

class LoRA(nnx.Module):
  """``base(x) + (x A) B``: a rank-``r`` update of a linear layer.

  ``base`` is an ``nnx.Linear`` or an ``nnx.LinearGeneral`` contracting the
  trailing axes of ``x`` (the attention projections); ``A`` is
  ``(d_in, r)`` with ``N(0, 1 / d_in)`` entries and ``B`` ``(r, d_out)`` zeros,
  so the wrapped layer starts equal to ``base`` (Hu et al. 2021). Adds
  ``r (d_in + d_out)`` parameters (``lora_a``, ``lora_b``).
  """

  def __init__(self, base: nnx.Module, rank: int, *, rngs: nnx.Rngs):
    if isinstance(base, nnx.LinearGeneral):
      in_shape, out_shape = tuple(base.in_features), tuple(base.out_features)
      if tuple(base.axis) != tuple(range(-len(in_shape), 0)):
        raise ValueError(f"LoRA needs the trailing axes contracted, got axis {base.axis}")
    else:
      in_shape, out_shape = (base.in_features,), (base.out_features,)
    self.base = base
    self.in_shape, self.out_shape = in_shape, out_shape
    d_in = int(np.prod(in_shape))
    d_out = int(np.prod(out_shape))
    self.lora_a = nnx.Param(jax.random.normal(rngs.params(), (d_in, rank)) / np.sqrt(d_in))
    self.lora_b = nnx.Param(jnp.zeros((rank, d_out)))

  @property
  def kernel(self) -> jax.Array:
    """The effective kernel ``W + A B`` in the base's shape (for code that reads
    the kernel instead of calling the layer, e.g. :func:`self_attention`)."""
    w = self.base.kernel[...]
    return w + (self.lora_a[...] @ self.lora_b[...]).reshape(w.shape).astype(w.dtype)

  @property
  def bias(self):
    return self.base.bias

  def __call__(self, x, **kwargs):  # kwargs (e.g. out_sharding) go to the base layer
    lead = x.shape[:x.ndim - len(self.in_shape)]
    delta = (x.reshape(*lead, -1) @ self.lora_a[...]) @ self.lora_b[...]
    y = self.base(x, **kwargs)
    return y + delta.reshape(*lead, *self.out_shape).astype(y.dtype)


LORA_TARGETS = ("linear", "attention")


def add_lora(module: nnx.Module, rank: int, targets: str = "linear", *, rngs: nnx.Rngs,
             _attention: bool = False) -> int:
  """Wraps the linear layers under ``module`` in :class:`LoRA`, in place.

  ``targets``: ``"linear"`` every ``nnx.Linear`` / ``nnx.LinearGeneral``;
  ``"attention"`` only those inside an ``nnx.MultiHeadAttention`` (query,
  key, value, out). Returns the number of layers wrapped.
  """
  if targets not in LORA_TARGETS:
    raise ValueError(f"lora targets must be one of {LORA_TARGETS}, got {targets!r}")
  wrapped = 0
  for key, child in list(nnx.iter_children(module)):
    if not isinstance(child, nnx.Module) or isinstance(child, LoRA):
      continue
    if isinstance(child, (nnx.Linear, nnx.LinearGeneral)):
      if targets == "linear" or _attention:
        lora = LoRA(child, rank, rngs=rngs)
        if isinstance(module, nnx.List):
          module[key] = lora
        else:
          setattr(module, key, lora)
        wrapped += 1
    else:
      wrapped += add_lora(child, rank, targets, rngs=rngs,
                          _attention=_attention or isinstance(child, nnx.MultiHeadAttention))
  return wrapped


class ProxyTokens(nnx.Module):
  """Cross-modal proxy tokens (a reimplementation of Reza et al., arXiv 2501.17823).

  One learned query per (source ``a`` -> target ``m``) pair reads the source
  encoder's frame states (:meth:`Encoder.states`) with one multi-head
  attention per source, under the source's frame mask (padded and missing
  frames are never read); a LayerNorm per target (the encoders end in one)
  gives the proxy of ``z_m``. The queries only read: no frame attends to them.
  """

  def __init__(self, names: tuple[str, ...], dim: int, heads: int, *, rngs: nnx.Rngs):
    self.names = tuple(names)
    num = len(self.names)
    self.queries = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num, num, dim)))
    self.attn = nnx.Dict({m: nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
                          for m in self.names})
    self.norm = nnx.Dict({m: nnx.LayerNorm(dim, rngs=rngs) for m in self.names})

  def __call__(self, states: Mapping[str, jax.Array], masks: Mapping[str, jax.Array]):
    """``(B, M_source, M_target, k)``: every pair's proxy (the diagonal unused)."""
    reads = []
    for a, m in enumerate(self.names):
      h = states[m]
      if h.shape[1] == 1:
        # one frame (a vector modality): every query's softmax over one key is
        # exactly 1 (masked or not), so each pair reads the frame's value and
        # the queries carry no gradient; the same numbers without the
        # query-side projections of all M pairs
        attn = self.attn[m]
        read = attn.out(attn.value(h))
        reads.append(jnp.broadcast_to(read, (h.shape[0], len(self.names), read.shape[-1])))
        continue
      q = jnp.broadcast_to(self.queries[a][None], (h.shape[0],) + self.queries.shape[1:])
      reads.append(self.attn[m](q.astype(h.dtype), h, h, mask=masks[m][:, None, None, :],
                                deterministic=True))
    pairs = jnp.stack(reads, axis=1)
    return jnp.stack([self.norm[m](pairs[:, :, j]) for j, m in enumerate(self.names)], axis=2)

  def substitute(self, states, masks, z, present):
    """``(z, present, extra)``: a missing modality's embedding replaced by the
    mean of its proxies over the present sources (and marked present when it
    has one); ``extra``: ``proxy_pairs`` ``(B, M, M, k)``, ``proxies``
    ``(B, M, k)``, ``proxy_filled`` ``(B, M)``."""
    pairs = self(states, masks)
    sources = present[:, :, None] & ~jnp.eye(len(self.names), dtype=bool)[None]
    w = sources.astype(z.dtype)
    count = jnp.sum(w, axis=1)
    proxy = jnp.einsum("bam,bamk->bmk", w, pairs) / jnp.maximum(count, 1.0)[..., None]
    fill = ~present & (count > 0)
    z = jnp.where(fill[..., None], proxy, z)
    return z, present | fill, {"proxy_pairs": pairs, "proxies": proxy, "proxy_filled": fill}


class GatedFusion(nnx.Module):
  """``sum_m g_m * t_m`` with per-feature gates ``g = softmax_m(W [t_1; ...; t_M])``
  over the available tokens; for ``M = 2`` this is ``g * a + (1 - g) * b`` with
  ``g = sigmoid(W' [a; b])``. ``W`` starts at zero: the gate starts as the
  masked mean."""

  def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs):
    self.proj = nnx.Linear(num * dim, num * dim, kernel_init=nnx.initializers.zeros,
                           rngs=rngs)

  def __call__(self, tokens: jax.Array, available: jax.Array) -> jax.Array:
    b, num, k = tokens.shape
    logits = self.proj(tokens.reshape(b, num * k)).reshape(b, num, k)
    logits = jnp.where(available[..., None], logits, jnp.finfo(logits.dtype).min)
    g = jax.nn.softmax(logits, axis=1) * available[..., None].astype(tokens.dtype)
    return jnp.sum(g * tokens, axis=1)
