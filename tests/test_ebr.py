"""Explicit basis reallocation (reimplementation): gradient reversal, the
similarity-ranked fill, the ranking from training pairs, the nets' update, the
evaluation hook, and training through the real loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from modalimmune_jax import data, train
from modalimmune_jax.config import ConfigError, validate_config, with_overrides
from modalimmune_jax.methods import ebr as eb
from modalimmune_jax.methods.base import ModelFns
from modalimmune_jax.model import MultimodalModel
from tests.helpers import flat, get_config

SHAPES = {"text": (1, 5), "audio": (1, 3), "vision": (1, 2)}
SETTINGS = eb.Settings(shared_dim=6, hidden=10)


def _model_and_batch(n=8, seed=0):
  ds = data.make_synthetic((n, 2, 2), shapes=SHAPES, seed=seed)
  model = MultimodalModel(SHAPES, "classification", ds.num_outputs, hidden=8, num_heads=2,
                          rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  batch = {k: v for k, v in ds.splits["train"].batch(np.arange(n)).items() if k != "index"}
  return (ModelFns(graphdef, tuple(SHAPES), "classification"), params,
          jax.tree.map(jnp.asarray, batch))


def test_gradient_reversal_flips_the_encoder_gradient_exactly():
  nets = eb.init_nets(jax.random.key(0), 3, 8, 6, 10)
  z = jax.random.normal(jax.random.key(1), (5, 3, 8))
  present = jnp.array([[True, True, False]] * 5)

  def adv(nets, reversal):
    return eb.adversarial_loss(nets, eb.encode(nets, z), present, reversal)

  plain = jax.grad(adv)(nets, None)
  reversed_ = jax.grad(adv)(nets, 1.0)
  for a, b in zip(jax.tree.leaves(plain["enc"]), jax.tree.leaves(reversed_["enc"])):
    np.testing.assert_array_equal(np.asarray(b), -np.asarray(a))
  assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(plain["enc"]))
  # the classifier itself is not behind the reversal: same gradient
  for a, b in zip(jax.tree.leaves(plain["cls"]), jax.tree.leaves(reversed_["cls"])):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  # the coefficient scales it; the forward value is unchanged
  half = jax.grad(adv)(nets, 0.5)
  for a, b in zip(jax.tree.leaves(plain["enc"]), jax.tree.leaves(half["enc"])):
    np.testing.assert_allclose(np.asarray(b), -0.5 * np.asarray(a), rtol=1e-6)
  assert float(adv(nets, None)) == float(adv(nets, 1.0))
  # the model's encoders (upstream of the shared space) receive the reversed gradient too
  gz_plain = jax.grad(lambda z: eb.adversarial_loss(nets, eb.encode(nets, z), present, None))(z)
  gz_rev = jax.grad(lambda z: eb.adversarial_loss(nets, eb.encode(nets, z), present, 1.0))(z)
  np.testing.assert_array_equal(np.asarray(gz_rev), -np.asarray(gz_plain))


def test_fill_uses_the_decoder_of_the_missing_modality_on_the_ranked_source():
  nets = eb.init_nets(jax.random.key(2), 3, 8, 6, 10)
  z = jax.random.normal(jax.random.key(3), (4, 3, 8))
  # modality 0 is most similar to 2, then 1; 1 is most similar to 0
  similarity = jnp.array([[1.0, 0.2, 0.9], [0.2, 1.0, 0.5], [0.9, 0.5, 1.0]])
  present = jnp.array([[False, True, True],    # 0 missing: from 2 (ranked first)
                       [False, True, False],   # 0 missing, only 1 available: from 1
                       [True, False, True],    # 1 missing: from 2 (0.5 > 0.2)
                       [True, True, True]])    # nothing missing
  f, out_present = eb.ebr_hook(nets, similarity)(z, present)
  assert bool(jnp.all(out_present))
  g = eb.encode(nets, z)
  dec = lambda m, x: eb._mlp(nets["dec"][m], x)
  np.testing.assert_allclose(f[0, 0], dec(0, g[0, 2]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f[1, 0], dec(0, g[1, 1]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f[1, 2], dec(2, g[1, 1]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f[2, 1], dec(1, g[2, 2]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(f[0, 0], dec(0, g[0, 1]), atol=1e-3)  # not the other source
  # present cells: their own round trip h_m^-1(h_m(z_m))
  for m in range(3):
    np.testing.assert_allclose(f[3, m], dec(m, g[3, m]), rtol=1e-5, atol=1e-6)
  # the ranking flips with the similarity
  flipped = similarity.at[0, 1].set(0.95).at[1, 0].set(0.95)
  f2, _ = eb.ebr_hook(nets, flipped)(z, present)
  np.testing.assert_allclose(f2[0, 0], dec(0, g[0, 1]), rtol=1e-5, atol=1e-6)


def _separable(n=32, m=3, dim=6, seed=7):
  """Shared-space vectors whose modality is obvious (a large offset per modality)."""
  g = jax.random.normal(jax.random.key(seed), (n, m, dim))
  return g + 4.0 * jnp.eye(m, dim)[None], jnp.ones((n, m), bool)


def test_confusion_sends_each_gradient_to_its_side_and_does_not_saturate():
  g, present = _separable()
  nets = eb.init_nets(jax.random.key(8), 3, 8, 6, 10)
  # the classifier's gradient is that of its own cross-entropy; g's is that of the
  # cross-entropy to the uniform distribution with the classifier held constant
  conf_cls = jax.grad(lambda c: eb.confusion_loss(dict(nets, cls=c), g, present)[0])(nets["cls"])
  ce_cls = jax.grad(lambda c: eb.adversarial_loss(dict(nets, cls=c), g, present, None))(
      nets["cls"])
  for a, b in zip(jax.tree.leaves(conf_cls), jax.tree.leaves(ce_cls)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  def to_uniform(g):
    logp = jax.nn.log_softmax(eb.classify(nets, g), axis=-1)
    return -jnp.mean(logp)  # every cell present: the mean over cells and classes
  np.testing.assert_allclose(jax.grad(lambda g: eb.confusion_loss(nets, g, present)[0])(g),
                             jax.grad(to_uniform)(g), rtol=1e-5, atol=1e-7)
  # train the classifier until it is confident: the reversed cross-entropy then gives
  # the encoders (almost) nothing, the confusion loss still pushes
  tx = optax.adam(1e-2)

  @jax.jit
  def fit(cls, opt):
    grads = jax.grad(lambda c: eb.adversarial_loss(dict(nets, cls=c), g, present, None))(cls)
    updates, opt = tx.update(grads, opt, cls)
    return optax.apply_updates(cls, updates), opt
  cls, opt = nets["cls"], tx.init(nets["cls"])
  for _ in range(300):
    cls, opt = fit(cls, opt)
  confident = dict(nets, cls=cls)
  ce = float(eb.confusion_loss(confident, g, present)[1])
  assert ce < 1e-2, ce  # the classifier wins (log 3 = 1.1 when confused)
  g_rev = jax.grad(lambda g: eb.adversarial_loss(confident, g, present, 1.0))(g)
  g_conf = jax.grad(lambda g: eb.confusion_loss(confident, g, present)[0])(g)
  assert float(jnp.linalg.norm(g_conf)) > 30 * float(jnp.linalg.norm(g_rev))


def test_cross_reconstruction_trains_the_fill_toward_the_true_embedding():
  """Modality 1 is an invertible linear function of modality 0: trained with
  the cross term, the fill of a missing modality 0 from modality 1 is close to
  what modality 0's own round trip gives; without it, it is not."""
  k, n = 4, 256
  a = jax.random.normal(jax.random.key(9), (k, k)) + 2.0 * jnp.eye(k)
  z0 = jax.random.normal(jax.random.key(10), (n, k))
  z = jnp.stack([z0, z0 @ a], axis=1)
  present = jnp.ones((n, 2), bool)
  held_out = jax.random.normal(jax.random.key(11), (64, k))
  z_test = jnp.stack([held_out, held_out @ a], axis=1)

  def fit(cross_weight):
    nets = eb.init_nets(jax.random.key(12), 2, k, 8, 32)
    tx = optax.adam(3e-3)

    def objective(nets, key):
      g = eb.encode(nets, z)
      round_trip = jnp.mean((eb.decode(nets, g) - z) ** 2)  # stands in for the task
      scores = jax.random.uniform(key, (n, 2, 2))
      return round_trip + cross_weight * eb.cross_loss(nets, g, present, scores)

    @jax.jit
    def step(nets, opt, key):
      grads = jax.grad(objective)(nets, key)
      updates, opt = tx.update(grads, opt, nets)
      return optax.apply_updates(nets, updates), opt
    opt = tx.init(nets)
    for i in range(600):
      nets, opt = step(nets, opt, jax.random.key(i))
    # the fill of modality 0 when only modality 1 is available
    f, _ = eb.ebr_hook(nets, jnp.eye(2))(z_test, jnp.array([[False, True]] * 64))
    own = eb.decode(nets, eb.encode(nets, z_test))[:, 0]
    return float(jnp.mean((f[:, 0] - own) ** 2) / jnp.mean(own ** 2))

  trained, untrained = fit(1.0), fit(0.0)
  assert trained < 0.05, trained
  assert untrained > 0.5, untrained


def test_similarity_is_the_mean_cosine_over_training_pairs_both_present():
  base = jax.random.normal(jax.random.key(4), (6, 4))
  other = jax.random.normal(jax.random.key(5), (6, 4))
  g = jnp.stack([base, 2.0 * base, other], axis=1)  # 0 and 1 parallel: cosine 1
  present = jnp.ones((6, 3), bool).at[0, 1].set(False)
  sums, counts = eb.pair_similarity(g, present)
  assert counts[0, 1] == 5 and counts[0, 2] == 6 and counts[1, 2] == 5
  np.testing.assert_allclose(sums[0, 1] / counts[0, 1], 1.0, rtol=1e-6)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  cos02 = np.sum(unit(np.asarray(base)) * unit(np.asarray(other)), -1)
  np.testing.assert_allclose(sums[0, 2] / counts[0, 2], cos02.mean(), rtol=1e-5)
  cos12 = cos02[1:]  # row 0 lacks modality 1: not a pair
  np.testing.assert_allclose(sums[1, 2] / counts[1, 2], cos12.mean(), rtol=1e-5)


def test_update_ranks_on_training_pairs_and_trains_the_nets():
  model, params, batch = _model_and_batch()
  method = eb.ebr(model, SETTINGS._replace(similarity_decay=0.5), optax.sgd(0.1), width=8)
  state = method.init(params)
  assert float(jnp.abs(state.similarity).max()) == 0.0
  key = jax.random.key(6)
  new, metrics = jax.jit(method.update)(state, params, batch, key, jnp.int32(0))
  # the first value of every pair is the batch's mean cosine similarity of g
  out = model.apply(params, batch, key, hook=eb.ebr_hook(state.nets, state.similarity))
  g = eb.encode(state.nets, out["embeddings"])
  sums, counts = eb.pair_similarity(g, batch["presence"].astype(bool))
  np.testing.assert_allclose(new.similarity, sums / counts, rtol=1e-4, atol=1e-6)
  assert float(new.seen.min()) == 1.0
  # the nets moved along the gradient of the objective (SGD: new = old - 0.1 * grad)
  def objective(nets):
    return method.loss(params, state._replace(nets=nets), batch, key)[0]
  grads = jax.grad(objective)(state.nets)
  for old, upd, gr in zip(jax.tree.leaves(state.nets), jax.tree.leaves(new.nets),
                          jax.tree.leaves(grads)):
    np.testing.assert_allclose(upd, old - 0.1 * gr, rtol=1e-4, atol=1e-6)
  # a pair never both present keeps its value; the EMA mixes in the next batch
  half = dict(batch, presence=batch["presence"].at[:, 1].set(False))
  newer, _ = jax.jit(method.update)(new, params, half, key, jnp.int32(1))
  np.testing.assert_array_equal(newer.similarity[0, 1], new.similarity[0, 1])
  assert not np.allclose(newer.similarity[0, 2], new.similarity[0, 2])
  assert np.isfinite(float(metrics["ebr_nets_loss"]))


def test_predict_uses_the_method_hook():
  model, params, batch = _model_and_batch()
  method = eb.ebr(model, SETTINGS, optax.sgd(0.1), width=8)
  state = method.init(params)
  state = state._replace(similarity=jnp.array([[1.0, 0.1, 0.9], [0.1, 1.0, 0.2],
                                               [0.9, 0.2, 1.0]]))
  predict = train.make_predict_fn(model.graphdef, method.predict_hook)
  missing = dict(batch, presence=batch["presence"].at[:, 0].set(False))
  got = predict(params, missing, state)
  expect = model.apply(params, missing, None, train=False,
                       hook=eb.ebr_hook(state.nets, state.similarity))["outputs"]
  np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
  bare = train.make_predict_fn(model.graphdef)(params, missing)
  assert not np.allclose(got, bare, atol=1e-4)


def test_config_names_a_bad_ebr_key():
  base = with_overrides(get_config("synthetic", "smoke"), {"method.name": "ebr"})
  validate_config(base)
  for key, value in (("method.ebr.shared_dim", 0), ("method.ebr.adversarial_weight", -1.0),
                     ("method.ebr.similarity_decay", 1.0), ("method.ebr.adversarial", "gan"),
                     ("method.ebr.cross_weight", -1.0), ("method.ebr.dropout_rate", 1.0)):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
      validate_config(with_overrides(base, {key: value}))


def test_ebr_train_and_evaluate_checkpoints_and_evaluates_with_the_fill(tmp_path):
  config = with_overrides(get_config("synthetic", "smoke"),
                          {"method.name": "ebr", "method.ebr.shared_dim": 8,
                           "method.ebr.hidden": 16, "train.steps": 4, "checkpoint.every": 2,
                           "train.log_every": 2, "eval.removals": "drop_one",
                           "eval.missing_rates": (), "eval.snrs_db": ()})
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  rows = summary["protocol"]["rows"]
  assert len(rows) >= 4  # full and the three drop-one conditions
  assert all(v is not None for r in rows for k, v in r.items() if k not in ("condition",
                                                                            "convention"))
  # resumable: a second call finds the finished checkpoint with the nets in it
  again = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert again["start_step"] == 4
  np.testing.assert_array_equal(flat(again["final_state"].method_state.nets),
                                flat(summary["final_state"].method_state.nets))
