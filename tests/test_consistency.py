"""The consistency-regularisation baseline (Cai et al. 2025): divergences, perturbations,
the PGD attack on an embedding, and training through the real loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modalimmune_jax import data, train
from modalimmune_jax.config import ConfigError, with_overrides
from modalimmune_jax.methods import consistency as co
from modalimmune_jax.methods.base import ModelFns
from modalimmune_jax.methods.plain import supervised_loss
from modalimmune_jax.model import MultimodalModel
from modalimmune_jax.step import host_copy
from tests.helpers import get_config, run_finite_steps

SHAPES = {"text": (4, 5), "audio": (1, 3), "vision": (3, 2)}


def _model_and_batch(task="classification", n=12, seed=0, **model_kw):
  ds = data.make_synthetic((n, 2, 2), shapes=SHAPES, variable_length=True, seed=seed,
                           task=task)
  num = 1 if task == "regression" else ds.num_outputs
  model = MultimodalModel(SHAPES, task, num, hidden=8, num_heads=2, rngs=nnx.Rngs(seed),
                          **model_kw)
  graphdef, params = nnx.split(model)
  batch = {k: v for k, v in ds.splits["train"].batch(np.arange(n)).items() if k != "index"}
  return ModelFns(graphdef, tuple(SHAPES), task), params, jax.tree.map(jnp.asarray, batch)


# -------------------------------------------------------------- divergences ----

def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _floor(p, eps=1e-6):
  p = np.maximum(p, eps)
  return p / p.sum(-1, keepdims=True)


def test_kl_is_zero_for_identical_inputs_and_matches_its_formula():
  logits = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [3.0, 1.0, -2.0]], np.float32)
  np.testing.assert_allclose(co.kl_divergence(jnp.asarray(logits), jnp.asarray(logits)), 0.0,
                             atol=1e-6)
  other = logits[::-1].copy()
  for t in (1.0, 2.0):
    p, q = _softmax(logits / t), _floor(_softmax(other / t))
    expect = np.sum(q * (np.log(q) - np.log(p)), -1)  # KL(Q || P), Q the perturbed
    np.testing.assert_allclose(co.kl_divergence(jnp.asarray(other), jnp.asarray(logits), t),
                               expect, rtol=1e-5)
  # multi-label logits (B, C, 2): summed over the labels
  ml = np.random.default_rng(0).normal(size=(2, 4, 2)).astype(np.float32)
  ml2 = ml + 0.5
  per_label = [np.asarray(co.kl_divergence(jnp.asarray(ml2[:, c]), jnp.asarray(ml[:, c])))
               for c in range(4)]
  np.testing.assert_allclose(co.kl_divergence(jnp.asarray(ml2), jnp.asarray(ml)),
                             np.sum(per_label, 0), rtol=1e-5)


def test_js_variants_match_their_formulas():
  clean = np.array([[2.0, -1.0, 0.5], [0.3, 0.1, -4.0]], np.float32)
  pert = np.array([[-1.0, 1.0, 0.0], [25.0, -20.0, 0.0]], np.float32)  # row 2: tiny probs
  p, q = _softmax(clean.astype(np.float64)), _softmax(pert.astype(np.float64))
  kl = lambda a, b: np.sum(a * (np.log(a) - np.log(b)), -1)
  # textbook: 0.5 KL(P || M) + 0.5 KL(Q || M)
  m = 0.5 * (p + q)
  textbook = 0.5 * kl(p, m) + 0.5 * kl(q, m)
  got = np.asarray(co.js_divergence(jnp.asarray(pert), jnp.asarray(clean)))
  np.testing.assert_allclose(got, textbook, rtol=1e-4)
  assert np.all(got <= np.log(2) + 1e-6)
  np.testing.assert_allclose(co.js_divergence(jnp.asarray(clean), jnp.asarray(pert)), got,
                             rtol=1e-5)  # symmetric
  # the authors': 0.5 [KL(M' || P) + KL(M' || Q)], M' from the floored distributions
  m_f = 0.5 * (_floor(p) + _floor(q))
  authors = 0.5 * (np.sum(m_f * (np.log(m_f) - np.log(p)), -1)
                   + np.sum(m_f * (np.log(m_f) - np.log(q)), -1))
  got_a = np.asarray(co.js_authors_divergence(jnp.asarray(pert), jnp.asarray(clean)))
  np.testing.assert_allclose(got_a, authors, rtol=1e-4)
  assert not np.allclose(got_a, got)  # a different quantity
  for fn in (co.js_divergence, co.js_authors_divergence):
    np.testing.assert_allclose(fn(jnp.asarray(clean), jnp.asarray(clean)), 0.0, atol=1e-6)
  # regression: squared difference of the predictions
  np.testing.assert_allclose(co.divergence("regression", "kl", jnp.array([1.0, 2.0]),
                                           jnp.array([0.5, 2.0])), [0.25, 0.0])


# ------------------------------------------------------------ perturbations ----

def test_targets_are_one_present_allowed_modality_per_sample():
  present = jnp.array([[True, True, True], [False, True, True], [True, False, False]] * 400)
  u = jax.random.uniform(jax.random.key(0), (1200,))
  t = np.asarray(co.choose_targets(u, present, jnp.array([True, True, True])))
  assert (t.sum(1) == 1).all() and not (t & ~np.asarray(present)).any()
  np.testing.assert_allclose(t[0::3].mean(0), 1 / 3, atol=0.08)  # uniform among present
  only = np.asarray(co.choose_targets(u, present, jnp.array([False, True, False])))
  assert (only[:, 1] == np.asarray(present)[:, 1]).all() and not only[:, [0, 2]].any()


@pytest.mark.parametrize("kind", ["zero", "noise", "swap"])
def test_heuristic_copy_perturbs_only_the_target(kind):
  model, _, batch = _model_and_batch()
  n = batch["presence"].shape[0]
  target = jax.nn.one_hot(jnp.arange(n) % 3, 3, dtype=bool)
  out = co.heuristic_copy(batch, target, jax.random.key(1), model.names, (kind,), 2.0)
  for j, m in enumerate(model.names):
    x, y = np.asarray(batch["inputs"][m]), np.asarray(out["inputs"][m])
    hit = np.asarray(target[:, j])
    np.testing.assert_array_equal(y[~hit], x[~hit])
    np.testing.assert_array_equal(out["masks"][m][~hit], batch["masks"][m][~hit])
    mask = np.asarray(batch["masks"][m])[hit]
    if kind == "zero":
      assert not y[hit].any()
      np.testing.assert_array_equal(out["masks"][m][hit], mask)
    elif kind == "noise":
      assert np.all(y[hit][mask] != x[hit][mask]) and not y[hit][~mask].any()
      assert 1.0 < np.std(y[hit][mask]) < 4.0  # noise_std = 2
    else:  # swapped in from another sample, with its frame mask
      rows = np.flatnonzero(hit)
      for r in rows:
        src = [s for s in range(n) if s != r and np.array_equal(x[s], y[r])]
        assert src and np.array_equal(np.asarray(out["masks"][m][r]),
                                      np.asarray(batch["masks"][m][src[0]]))
  np.testing.assert_array_equal(out["labels"], batch["labels"])


def test_pgd_stays_within_eps_raises_the_loss_and_freezes_the_model():
  model, params, batch = _model_and_batch()
  n = batch["presence"].shape[0]
  target = jax.nn.one_hot(jnp.arange(n) % 3, 3, dtype=bool)
  eps = 0.3
  delta0 = jax.random.uniform(jax.random.key(2), (n, 3, 8), minval=-eps, maxval=eps)

  @jax.jit
  def attack(p):
    return co.pgd_delta(model, p, batch, target, delta0, jax.random.key(3), step_size=200.0,
                        eps=eps, steps=3)

  delta = attack(params)
  assert float(jnp.max(jnp.abs(delta))) <= eps + 1e-7  # infinity norm, per coordinate
  np.testing.assert_array_equal(delta * ~target[..., None], 0.0)  # only the target modality
  assert float(jnp.mean(jnp.abs(delta[target]))) > 0.5 * eps  # it moved towards the corners

  @jax.jit
  def loss_of(d):
    out = model.apply(params, batch, jax.random.key(4), hook=co._delta_hook(d, target, True))
    return model.task_loss(out["outputs"], batch["labels"])

  loss_with = lambda d: float(loss_of(d))

  clean, attacked = loss_with(jnp.zeros_like(delta)), loss_with(delta)
  start = loss_with(jnp.clip(delta0, -eps, eps) * target[..., None])
  assert attacked > clean and attacked > start, (clean, start, attacked)
  # the model is frozen during the attack: no gradient reaches the parameters through it
  grads = jax.grad(lambda p: jnp.sum(attack(p) ** 2))(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_attacking_the_clean_embeddings_equals_rerunning_the_encoders():
  """Without dropout the encoders give every pass the same embeddings: PGD on the
  clean pass's (the encoders run once) is the attack that reruns them."""
  model, params, batch = _model_and_batch()
  n = batch["presence"].shape[0]
  target = jax.nn.one_hot(jnp.arange(n) % 3, 3, dtype=bool)
  delta0 = jax.random.uniform(jax.random.key(2), (n, 3, 8), minval=-0.3, maxval=0.3)
  z = model.apply(params, batch, jax.random.key(7))["embeddings"]

  @jax.jit
  def attack(p, embeddings):
    # a small step and a wide box: the steps' gradients show, not only their signs
    return co.pgd_delta(model, p, batch, target, delta0, jax.random.key(3), step_size=0.5,
                        eps=10.0, steps=3, embeddings=embeddings)

  ours, rerun = attack(params, z), attack(params, None)
  assert float(jnp.max(jnp.abs(ours - delta0 * target[..., None]))) > 1e-3  # it moved
  np.testing.assert_allclose(ours, rerun, rtol=1e-6, atol=1e-7)
  # other embeddings are attacked as given (the argument is read)
  other = jax.random.normal(jax.random.key(8), z.shape)
  assert not np.allclose(attack(params, other), rerun, atol=1e-3)


def test_without_copies_the_loss_is_plain_training():
  model, params, batch = _model_and_batch()
  off = co.consistency(model, co.Settings(heuristics=(), pgd_steps=0))
  key = jax.random.key(5)
  total, _, metrics = off.loss(params, (), batch, key)
  _, _, _, _, k_clean, _ = jax.random.split(key, 6)
  expect, _, _ = supervised_loss(model, params, batch, k_clean, 1.0)
  np.testing.assert_allclose(total, expect, rtol=1e-6)
  assert "consistency" not in metrics and "pgd_loss" not in metrics


@pytest.mark.parametrize("divergence", ["kl", "js", "js_authors"])
def test_loss_adds_the_perturbed_terms(divergence):
  model, params, batch = _model_and_batch()
  s = co.Settings(pgd_eps=0.1, pgd_step_size=10.0, weight=0.5, divergence=divergence)
  total, destructive, m = jax.jit(co.consistency(model, s).loss)(params, (), batch,
                                                                 jax.random.key(6))
  assert destructive == 0.0
  expect = m["clean_loss"] + m["pgd_loss"] + 0.5 * m["consistency"] + m["recon_loss"]
  np.testing.assert_allclose(total, expect, rtol=1e-5)
  assert float(m["consistency"]) > 0 and float(m["pgd_gain"]) > 0
  with pytest.raises(ValueError, match="divergence"):
    co.consistency(model, co.Settings(divergence="jsd"))
  with pytest.raises(ValueError, match="heuristics"):
    co.consistency(model, co.Settings(heuristics=("blur",)))


# ------------------------------------------------------------- in the loop ----

@pytest.mark.parametrize("overrides", [
    {},
    {"data.synthetic.task": "regression", "method.consistency.divergence": "js_authors",
     "method.consistency.pgd_steps": 1, "method.consistency.heuristics": ("swap",)},
])
def test_consistency_trains_finite_through_the_loop(overrides):
  config = with_overrides(get_config("synthetic", "smoke"),
                          {"method.name": "consistency", **overrides})
  run = train.setup(config)

  def each(s, metrics):
    assert "consistency" in metrics
  state = run_finite_steps(run, 3, each)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(host_copy(state.params)))


def test_config_names_a_bad_consistency_key():
  from modalimmune_jax.config import validate_config
  base = with_overrides(get_config("synthetic", "smoke"), {"method.name": "consistency"})
  validate_config(base)
  for key, value in (("method.consistency.divergence", "jsd"),
                     ("method.consistency.heuristics", ("blur",)),
                     ("method.consistency.pgd_steps", -1),
                     ("method.consistency.pgd_eps", -0.1),
                     ("method.consistency.temperature", 0.0)):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
      validate_config(with_overrides(base, {key: value}))
  with pytest.raises(ConfigError, match="method.consistency.targets"):
    train.setup(with_overrides(base, {"method.consistency.targets": ("video",)}))
