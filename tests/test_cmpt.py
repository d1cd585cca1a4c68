"""Cross-modal proxy tokens (CMPT, Reza et al. 2025; a reimplementation): the proxy
tokens, LoRA and the freeze, the attention mask, prediction with proxies, and training
through the real loop across the phase boundary."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from modalimmune_jax import data, train
from modalimmune_jax.config import ConfigError, validate_config
from modalimmune_jax.masking import remove_modalities
from modalimmune_jax.methods import cmpt as cm
from modalimmune_jax.model import LoRA, MultimodalModel
from modalimmune_jax.step import host_copy, shard_batch
from tests.helpers import get_config

SHAPES = {"text": (4, 5), "audio": (1, 3), "vision": (3, 2)}


def _model_and_batch(n=12, seed=0, **model_kw):
  ds = data.make_synthetic((n, 2, 2), shapes=SHAPES, variable_length=True, seed=seed)
  model = MultimodalModel(SHAPES, "classification", ds.num_outputs, hidden=8, num_heads=2,
                          rngs=nnx.Rngs(seed), **model_kw)
  batch = {k: v for k, v in ds.splits["train"].batch(np.arange(n)).items() if k != "index"}
  return model, jax.tree.map(jnp.asarray, batch)


def _groups(params):
  return [(cm.param_group(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)]


# ------------------------------------------------------------- proxy tokens ----

def test_proxy_approaches_the_true_embedding_when_one_modality_determines_the_other():
  # "b" is a fixed linear function of the mean of "a"'s real frames (variable length)
  rng = np.random.default_rng(0)
  n, length, width = 256, 4, 3
  x = rng.normal(size=(n, length, width)).astype(np.float32)
  lengths = rng.integers(1, length + 1, n)
  mask = np.arange(length)[None] < lengths[:, None]
  x = np.where(mask[..., None], x, 0.0)
  mean = x.sum(1) / lengths[:, None]
  y = (mean @ rng.normal(size=(width, 4)))[:, None].astype(np.float32)
  shapes = {"a": (length, width), "b": (1, 4)}
  model = MultimodalModel(shapes, "classification", 2, hidden=8, num_heads=2,
                          proxy_tokens=True, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  inputs = {"a": jnp.asarray(x), "b": jnp.asarray(y)}
  masks = {"a": jnp.asarray(mask), "b": jnp.ones((n, 1), bool)}
  present = jnp.ones((n, 2), bool)
  train_rows, test_rows = slice(0, 192), slice(192, None)

  def forward(p, rows):
    out = nnx.merge(graphdef, p)({m: v[rows] for m, v in inputs.items()},
                                 {m: v[rows] for m, v in masks.items()}, present[rows])
    return out

  def loss(p):
    return cm.alignment_loss(forward(p, train_rows), present[train_rows], "mse")

  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, s):
    value, g = jax.value_and_grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, value

  @jax.jit
  def held_out_error(p):
    out = forward(p, test_rows)
    proxy, z = out["proxy_pairs"][:, 0, 1], out["embeddings"][:, 1]  # a -> b
    return jnp.mean((proxy - z) ** 2) / jnp.mean((z - z.mean(0)) ** 2)

  state = opt.init(params)
  before = float(held_out_error(params))
  for _ in range(200):
    params, state, value = step(params, state)
  after = float(held_out_error(params))
  # the target moves too (the encoder of "b" is trained by the other terms only:
  # here not at all), so the proxy must explain most of z_b's variance on new samples
  assert after < 0.1 < before, (before, after)


def test_alignment_counts_only_pairs_with_both_modalities_present():
  b, m, k = 3, 3, 2
  z = jnp.zeros((b, m, k))
  pairs = jnp.ones((b, m, m, k))  # every pair off by 1 in every coordinate
  pairs = pairs.at[0, 0, 1].set(3.0)  # sample 0: text -> audio off by 3
  present = jnp.array([[True, True, False], [True, False, False], [True, True, True]])
  out = {"proxy_pairs": pairs, "embeddings": z}
  # valid: sample 0: (0,1), (1,0); sample 1: none; sample 2: all 6 off-diagonal
  expect = (9.0 + 1.0 + 6 * 1.0) / 8
  np.testing.assert_allclose(cm.alignment_loss(out, present, "mse"), expect, rtol=1e-6)
  np.testing.assert_allclose(cm.alignment_loss(out, present, "l1"), (3.0 + 7) / 8, rtol=1e-6)
  # cosine: parallel vectors have distance 0
  out = {"proxy_pairs": pairs, "embeddings": jnp.ones((b, m, k))}
  np.testing.assert_allclose(cm.alignment_loss(out, present, "cosine"), 0.0, atol=1e-6)
  # the target is under stop_gradient
  g = jax.grad(lambda e: cm.alignment_loss({"proxy_pairs": pairs, "embeddings": e},
                                           present))(z)
  assert np.all(np.asarray(g) == 0)


def test_attention_mask_hides_padded_frames():
  model, batch = _model_and_batch(proxy_tokens=True)
  mask = np.asarray(batch["masks"]["text"])
  assert (~mask).any() and mask.any(1).all()  # some padded frames, every sample has one
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda inputs: nnx.merge(graphdef, params)(inputs, batch["masks"],
                                                           batch["presence"])["proxy_pairs"])
  base = run(batch["inputs"])
  noise = np.random.default_rng(1).normal(size=mask.shape + (5,)).astype(np.float32) * 10
  padded = dict(batch["inputs"], text=jnp.where(mask[..., None], batch["inputs"]["text"],
                                                noise))
  changed = run(padded)
  np.testing.assert_allclose(changed, base, rtol=1e-5, atol=1e-6)
  real = dict(batch["inputs"], text=jnp.where(mask[..., None], noise, 0.0))
  assert not np.allclose(run(real)[:, 0], base[:, 0], atol=1e-3)  # the real frames count


def test_one_frame_source_reads_its_value_as_flax_attention_does():
  """A vector source (one frame) skips the query side; the proxies and every
  parameter's gradient equal flax's attention over that frame, masked or not."""
  model, batch = _model_and_batch(proxy_tokens=True)
  proxies = model.proxies
  model_def, model_params = nnx.split(model)
  states = jax.jit(lambda p: nnx.merge(model_def, p).encode(batch["inputs"],
                                                           batch["masks"])[0])(model_params)
  # the audio frame masked out for half the samples: a row without keys is uniform
  masks = dict(batch["masks"], audio=batch["masks"]["audio"].at[::2].set(False))
  graphdef, params = nnx.split(proxies)

  def reference(params):  # flax's attention for every source (no shortcut)
    p = nnx.merge(graphdef, params)
    reads = []
    for a, m in enumerate(p.names):
      h = states[m]
      q = jnp.broadcast_to(p.queries[a][None], (h.shape[0],) + p.queries.shape[1:])
      reads.append(p.attn[m](q, h, h, mask=masks[m][:, None, None, :], deterministic=True))
    pairs = jnp.stack(reads, axis=1)
    return jnp.stack([p.norm[m](pairs[:, :, j]) for j, m in enumerate(p.names)], axis=2)

  def ours(params):
    return nnx.merge(graphdef, params)(states, masks)

  n, m = batch["presence"].shape
  weights = jax.random.normal(jax.random.key(1), (n, m, m, 8))

  @jax.jit
  def values_and_grads(params):  # one program: the values and both gradients
    grad = lambda f: jax.grad(lambda p: jnp.sum(weights * f(p)))(params)
    return ours(params), reference(params), grad(ours), grad(reference)

  v_ours, v_ref, g_ours, g_ref = values_and_grads(params)
  np.testing.assert_array_equal(v_ours, v_ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               g_ours, g_ref)
  assert np.all(np.asarray(g_ours["queries"][...])[1] == 0)  # audio's queries: no gradient


# --------------------------------------------------------------------- LoRA ----

@pytest.mark.parametrize("rank,targets", [(1, "linear"), (2, "linear"), (3, "attention")])
def test_lora_adds_exactly_r_times_in_plus_out_and_starts_as_the_base(rank, targets):
  plain, batch = _model_and_batch()
  lora, _ = _model_and_batch(lora_rank=rank, lora_targets=targets)
  count = lambda mdl: sum(x.size for x in jax.tree.leaves(nnx.state(mdl, nnx.Param)))
  expected = 0
  wrapped = [mod for _, mod in nnx.iter_graph(lora) if isinstance(mod, LoRA)]
  for mod in wrapped:
    d_in, d_out = int(np.prod(mod.in_shape)), int(np.prod(mod.out_shape))
    assert mod.base.kernel.size == d_in * d_out
    expected += rank * (d_in + d_out)
  if targets == "linear":  # every linear layer of the encoders, none elsewhere
    linears = [mod for _, mod in nnx.iter_graph(plain.encoders)
               if isinstance(mod, (nnx.Linear, nnx.LinearGeneral))]
    assert len(wrapped) == len(linears)
  else:  # query, key, value, out of the one sequence encoders' attention: text, vision
    assert len(wrapped) == 2 * 4
  assert count(lora) - count(plain) == expected
  # code that reads the kernel (model.self_attention) sees W + A B: the same function
  key = jax.random.key(1)
  for i, mod in enumerate(wrapped[:4]):
    x = jax.random.normal(jax.random.fold_in(key, i), (2, 3) + mod.in_shape)
    b = jax.random.normal(jax.random.fold_in(key, 100 + i), mod.lora_b.shape)
    layer = nnx.clone(mod)
    layer.lora_b[...] = b
    flat_x = x.reshape(2, 3, -1)
    flat_k = layer.kernel.reshape(flat_x.shape[-1], -1)
    expect = (flat_x @ flat_k).reshape((2, 3) + mod.out_shape) + layer.bias[...]
    np.testing.assert_allclose(layer(x), expect, rtol=1e-4, atol=1e-5)
  # B = 0 and the base weights drawn as without LoRA: the same function
  out = lambda mdl: mdl(batch["inputs"], batch["masks"], batch["presence"])["outputs"]
  np.testing.assert_array_equal(out(lora), out(plain))


def test_phase_freeze_is_exact_under_adamw_momentum_and_weight_decay():
  model, _ = _model_and_batch(proxy_tokens=True, lora_rank=1, gated_fusion=True)
  params = nnx.state(model, nnx.Param)
  freeze = cm.phase_freeze(2)
  opt = optax.chain(freeze, optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1),
                    freeze)
  state = opt.init(params)
  history = [params]

  @jax.jit
  def step(params, state, key):
    grads = jax.tree.map(lambda x: jax.random.normal(key, x.shape), params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(5):
    params, state = step(params, state, jax.random.key(i))
    history.append(params)
  for (group, a0), (_, a2), (_, a5) in zip(*(_groups(h) for h in
                                              (history[0], history[2], history[5]))):
    a0, a2, a5 = map(np.asarray, (a0, a2, a5))
    if group == "encoder":
      assert not np.array_equal(a0, a2) or a0.size == 0
      np.testing.assert_array_equal(a2, a5)  # frozen after 2 updates
    elif group in ("lora", "proxy"):
      np.testing.assert_array_equal(a0, a2)  # trained only after the freeze
      assert not np.array_equal(a2, a5)
  assert {g for g, _ in _groups(params)} == {"encoder", "lora", "proxy", "other"}


# --------------------------------------------------------------- prediction ----

def test_missing_modality_prediction_uses_the_proxy():
  model, batch = _model_and_batch(proxy_tokens=True, lora_rank=1, gated_fusion=True)
  graphdef, params = nnx.split(model)
  keep = jnp.array([True, False, True])  # audio missing
  dropped = remove_modalities(batch, keep, tuple(SHAPES))
  predicted = train.make_predict_fn(graphdef)(params, dropped)

  names = tuple(SHAPES)
  states = {m: model.encoders[m].states(dropped["inputs"][m], dropped["masks"][m], train=False,
                                         rngs=None) for m in names}
  pairs = model.proxies(states, dropped["masks"])            # (B, source, target, k)
  proxy_audio = (pairs[:, 0, 1] + pairs[:, 2, 1]) / 2          # text, vision -> audio
  everything = jnp.ones_like(dropped["presence"])

  def with_audio(fill):
    def hook(z, present):
      return z.at[:, 1].set(fill), everything
    return model(dropped["inputs"], dropped["masks"], dropped["presence"],
                 embedding_hook=hook)["outputs"]

  explicit = with_audio(proxy_audio)
  zero_filled = with_audio(jnp.zeros_like(proxy_audio))
  np.testing.assert_allclose(predicted, explicit, rtol=1e-5, atol=1e-6)
  assert not np.allclose(predicted, zero_filled, atol=1e-4)
  out = model(dropped["inputs"], dropped["masks"], dropped["presence"])
  assert np.all(np.asarray(out["proxy_filled"])[:, 1])
  assert not np.asarray(out["proxy_filled"])[:, [0, 2]].any()
  assert not np.asarray(out["presence"])[:, 1].any()  # the real presence is reported


# ------------------------------------------------------------ through setup ----

def test_training_through_setup_crosses_the_phase_boundary():
  config = get_config("synthetic", "smoke")
  config.method.name = "cmpt"
  config.train.steps = 6           # 3 plain steps, then 3 adapting
  validate_config(config)
  run = train.setup(config, num_devices=1)
  assert cm.pretrain_steps(config) == 3
  state, history, records = run.state, [host_copy(run.state.params)], []
  for i in range(6):
    state, metrics = run.step_fn(state, shard_batch(run.batches(i), run.mesh),
                                 jax.random.key(i))
    history.append(host_copy(state.params))
    records.append({k: float(v) for k, v in metrics.items()})
  assert all(np.isfinite(r["loss"]) and r["nonfinite"] == 0 for r in records)
  assert [r["adapting"] for r in records] == [0, 0, 0, 1, 1, 1]
  assert all(r["align_loss"] > 0 and r["kept_fraction"] < 1 for r in records[3:])
  # the phase lives in the checkpointed state: the method's counter and both freezes'
  freezes = [x for x in jax.tree.leaves(state.opt_state,
                                        is_leaf=lambda x: isinstance(x, cm.FreezeState))
             if isinstance(x, cm.FreezeState)]
  assert int(state.method_state) == 6 and [int(f.count) for f in freezes] == [6, 6]
  for (group, a0), (_, a3), (_, a6) in zip(*(_groups(history[i]) for i in (0, 3, 6))):
    if group == "encoder":
      np.testing.assert_array_equal(a3, a6)
    elif group in ("lora", "proxy"):
      np.testing.assert_array_equal(a0, a3)
  changed = lambda g, a, b: any(not np.array_equal(x, y) for (h, x), (_, y)
                                in zip(_groups(a), _groups(b)) if h == g)
  assert changed("encoder", history[0], history[3])
  assert changed("lora", history[3], history[6]) and changed("other", history[3], history[6])


def test_config_rejects_bad_cmpt_values():
  for key, value in [("distance", "cos"), ("lora_rank", -1), ("lora_targets", "mlp"),
                     ("pretrain_fraction", 1.0), ("train_rate", 1.5)]:
    config = get_config("synthetic", "smoke")
    config.method.name = "cmpt"
    config.method.cmpt[key] = value
    with pytest.raises(ConfigError, match=f"method.cmpt.{key}"):
      validate_config(config)


@pytest.mark.slow
def test_train_and_evaluate_resumes_across_the_freeze(tmp_path):
  """The phase lives in the checkpoint: stopped after step 5 (plain, of 6) and resumed,
  the run ends where an uninterrupted one does; the protocol evaluates with proxies."""
  from tests.helpers import flat

  def config(stop_after=0):
    c = get_config("synthetic", "smoke")
    c.method.name = "cmpt"
    c.eval.removals = "drop_one"
    c.train.stop_after = stop_after
    return c

  full = train.train_and_evaluate(config(), str(tmp_path / "full"))
  rows = full["protocol"]["rows"]  # non-finite metrics would be None
  assert len(rows) > 1 and all(isinstance(r["accuracy"], float)
                               and isinstance(r["macro_f1"], float) for r in rows)
  first = train.train_and_evaluate(config(5), str(tmp_path / "resumed"))
  assert first["stopped"]
  second = train.train_and_evaluate(config(), str(tmp_path / "resumed"))
  assert second["start_step"] == 5 and not second["stopped"]
  np.testing.assert_array_equal(flat(second["final_params"]), flat(full["final_params"]))
