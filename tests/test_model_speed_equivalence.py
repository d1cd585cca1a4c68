"""The model's faster formulation (``model.self_attention``, no fusion mask when
every token is filled) computes the function of the formulation it replaced.

The reference below is a frozen copy of the old forward pass (flax's
``MultiHeadAttention.__call__`` with a ``(B, 1, 1, L)`` key mask, every
encoder and the fusion as before), run on the *same* module instances, so it
also pins the parameter names the old code read. Outputs and gradients must
agree to float32 rounding, on inputs with padded frames, zero-length
sequences and missing modalities, in eval and train mode (with dropout).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modalimmune_jax.model import MultimodalModel, masked_mean, self_attention


# ------------------------------------------------ the old formulation ----

def _old_block(block, x, key_mask, *, train, rngs):
  h = block.attn(block.norm1(x), mask=key_mask[:, None, None, :], deterministic=True)
  x = x + block.drop(h, deterministic=not train, rngs=rngs)
  h = block.fc2(jax.nn.gelu(block.fc1(block.norm2(x))))
  return x + block.drop(h, deterministic=not train, rngs=rngs)


def _old_encoder(enc, x, mask, *, train, rngs):
  h = enc.proj(x)
  if enc.sequence:
    h = h + enc.pos[...]
    for block in enc.blocks:
      h = _old_block(block, h, mask, train=train, rngs=rngs)
    pooled = masked_mean(h, mask, axis=1)
  else:
    pooled = h[:, 0] + enc.hidden(jax.nn.gelu(h[:, 0]))
  return enc.norm(pooled)


def _old_model(self, inputs, masks, presence, *, train=False, rngs=None, embedding_hook=None):
  z = jnp.stack([_old_encoder(self.encoders[m], inputs[m], masks[m], train=train, rngs=rngs)
                 for m in self.names], axis=1)
  present = presence.astype(bool)
  result = {"embeddings": z}
  if embedding_hook is not None:
    z, present = embedding_hook(z, present)
  tokens = jnp.where(present[..., None], z, 0.0)
  fill = jnp.zeros_like(z)
  if self.use_reconstruction:
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
  for block in self.fusion:
    tokens = _old_block(block, tokens, available, train=train, rngs=rngs)
  fused = self.norm(masked_mean(tokens, available, axis=1))
  out = self.head(fused)
  if self.task == "regression":
    out = out[:, 0]
  elif self.task == "multilabel":
    out = out.reshape(out.shape[0], self.num_outputs, 2)
  result.update(outputs=out, fused=fused, presence=present)
  return result


# ------------------------------------------------------------- inputs ----

SHAPES = {"text": (7, 5), "audio": (5, 3), "pose": (1, 2)}
B = 9


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  inputs = {m: jnp.asarray(rng.normal(size=(B, l, d)), jnp.float32)
            for m, (l, d) in SHAPES.items()}
  masks = {}
  for m, (l, _) in SHAPES.items():
    lengths = rng.integers(0, l + 1, size=B)
    lengths[0], lengths[1] = 0, l  # one sequence all padding, one without padding
    masks[m] = jnp.asarray(np.arange(l)[None] < lengths[:, None]) if l > 1 else jnp.ones(
        (B, 1), bool)
  presence = rng.random((B, len(SHAPES))) > 0.4
  presence[2] = False  # a sample with no modality at all
  presence[3] = True
  return inputs, masks, jnp.asarray(presence), jnp.asarray(rng.normal(size=B), jnp.float32)


def _compare(new, old, rtol, what):
  new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
  scale = max(np.max(np.abs(old)), 1e-30)
  err = np.max(np.abs(new - old)) / scale
  assert err <= rtol, f"{what}: max |new - old| / max |old| = {err:.2e} > {rtol:.0e}"


def _check(model, *, train=False, dropout_key=None, hook=None, tol=1e-5):
  graphdef, params = nnx.split(model)
  inputs, masks, presence, labels = _inputs()

  def loss(p, old):
    m = nnx.merge(graphdef, p)
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
    fn = (lambda *a, **k: _old_model(m, *a, **k)) if old else m
    out = fn(inputs, masks, presence, train=train, rngs=rngs, embedding_hook=hook)
    value = jnp.mean((out["outputs"].reshape(B, -1) - labels[:, None]) ** 2)
    value = value + jnp.mean(jnp.sin(out["fused"])) + jnp.mean(out["embeddings"] ** 2)
    if "reconstructions" in out:
      value = value + jnp.mean((out["reconstructions"] - out["embeddings"]) ** 2)
    return value, out

  grad = jax.value_and_grad(loss, has_aux=True)
  # one program for both (one compilation: this test's time)
  ((l_new, out_new), g_new), ((l_old, out_old), g_old) = jax.jit(
      lambda p: (grad(p, False), grad(p, True)))(params)
  assert set(out_new) == set(out_old)
  for key in out_old:
    if key == "presence":
      np.testing.assert_array_equal(out_new[key], out_old[key])
    else:
      _compare(out_new[key], out_old[key], tol, key)
  _compare(l_new, l_old, tol, "loss")
  assert jax.tree.structure(g_new) == jax.tree.structure(g_old)
  top = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_old))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_old), jax.tree.leaves(g_new)):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:
      # true gradient 0 (softmax ignores a shift of a row): rounding noise in both
      assert max(float(jnp.max(jnp.abs(a))), float(jnp.max(jnp.abs(b)))) <= tol * top, name
      continue
    # each leaf to float32 rounding of its own scale (floor: 1e-4 of the largest)
    scale = max(float(jnp.max(jnp.abs(a))), 1e-4 * top)
    err = float(jnp.max(jnp.abs(a - b))) / scale
    assert err <= 10 * tol, f"gradient {name}: {err:.2e}"


# -------------------------------------------------------------- tests ----

def test_same_function_filled_tokens_eval():
  """Property vectors and reconstruction: the fusion runs without a mask."""
  model = MultimodalModel(SHAPES, "classification", 3, hidden=8, num_heads=2,
                          property_vectors=True, reconstruction=True, rngs=nnx.Rngs(1))
  _check(model)


def test_same_function_masked_fusion_and_hook():
  """Neither part: missing tokens are masked out of the fusion (a sample with
  none at all); an embedding hook; head depth 6, so ``1 / sqrt(6)`` is
  applied to q instead of to the logits (equal to rounding)."""
  model = MultimodalModel(SHAPES, "regression", 1, hidden=12, num_heads=2, rngs=nnx.Rngs(3))
  _check(model, hook=lambda z, p: (z * 1.5, p.at[:, 0].set(False)))


def test_same_function_train_with_dropout():
  """Train mode with dropout: the same masks (the rng stream is drawn in the
  same order); two layers per encoder; multi-label head."""
  model = MultimodalModel(SHAPES, "multilabel", 2, hidden=8, num_heads=2, encoder_layers=2,
                          fusion_layers=1, dropout=0.3, property_vectors=True,
                          reconstruction=False, rngs=nnx.Rngs(2))
  _check(model, train=True, dropout_key=jax.random.key(5))


def test_self_attention_matches_flax_attention():
  """Against ``nnx.MultiHeadAttention.__call__`` itself, with large logits and
  rows whose every key is masked (uniform weights in both)."""
  attn = nnx.MultiHeadAttention(4, 16, decode=False, rngs=nnx.Rngs(4))
  x = 3.0 * jax.random.normal(jax.random.key(0), (5, 11, 16))
  mask = jax.random.bernoulli(jax.random.key(1), 0.6, (5, 11)).at[0].set(False).at[1].set(True)
  for key_mask in (mask, None):
    old = attn(x, mask=None if key_mask is None else key_mask[:, None, None, :],
               deterministic=True)
    _compare(self_attention(attn, x, key_mask), old, 1e-5, "attention")

    def grads(fn):
      return nnx.jit(nnx.grad(lambda a, x: jnp.sum(jnp.sin(fn(a, x))), argnums=(0, 1)))(attn, x)
    g_new = grads(lambda a, x: self_attention(a, x, key_mask))
    g_old = grads(lambda a, x: a(x, mask=None if key_mask is None
                                 else key_mask[:, None, None, :], deterministic=True))
    _compare(g_new[1], g_old[1], 1e-5, "d input")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nnx.state(g_old[0])),
                            jax.tree.leaves(nnx.state(g_new[0]))):
      if "key" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
        continue  # true gradient 0 (a shift of every logit of a row): rounding noise
      _compare(b, a, 1e-5, jax.tree_util.keystr(path))


def test_self_attention_refuses_other_attention():
  x = jnp.ones((2, 3, 8))
  for kwargs in ({"use_bias": False}, {"normalize_qk": True}, {"dropout_rate": 0.1}):
    attn = nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0), **kwargs)
    with pytest.raises(ValueError, match="only attention"):
      self_attention(attn, x, None)


def test_parameters_unchanged():
  """Checkpoints stay compatible: a block's parameters, names and shapes."""
  model = MultimodalModel({"a": (4, 3), "b": (1, 2)}, "regression", 1, hidden=8, num_heads=2,
                          rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  block = {jax.tree_util.keystr(p): x.shape for p, x in
           jax.tree_util.tree_leaves_with_path(params["fusion"][0])}
  assert block == {
      "['attn']['key']['bias'].value": (2, 4), "['attn']['key']['kernel'].value": (8, 2, 4),
      "['attn']['out']['bias'].value": (8,), "['attn']['out']['kernel'].value": (2, 4, 8),
      "['attn']['query']['bias'].value": (2, 4),
      "['attn']['query']['kernel'].value": (8, 2, 4),
      "['attn']['value']['bias'].value": (2, 4),
      "['attn']['value']['kernel'].value": (8, 2, 4),
      "['fc1']['bias'].value": (16,), "['fc1']['kernel'].value": (8, 16),
      "['fc2']['bias'].value": (8,), "['fc2']['kernel'].value": (16, 8),
      "['norm1']['bias'].value": (8,), "['norm1']['scale'].value": (8,),
      "['norm2']['bias'].value": (8,), "['norm2']['scale'].value": (8,)}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
