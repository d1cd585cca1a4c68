"""The method plug-in: controller, masking, modality dropout, ModalImmune's parts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from modalimmune_jax import controller as ctrl
from modalimmune_jax import spectral
from modalimmune_jax.config import ConfigError, base_config, validate_config, with_overrides
from modalimmune_jax.masking import random_presence, remove_modalities
from modalimmune_jax.methods import dropout as dr
from modalimmune_jax.methods import modalimmune as mi
from modalimmune_jax.methods.base import ModelFns, local_rows
from modalimmune_jax.methods.plain import supervised_loss


def _batch(n=6, names=("a", "b", "c")):
  rng = np.random.default_rng(0)
  return {"inputs": {m: jnp.asarray(rng.normal(size=(n, 2, 3)), jnp.float32) for m in names},
          "masks": {m: jnp.ones((n, 2), bool) for m in names},
          "presence": jnp.ones((n, len(names)), bool),
          "labels": jnp.zeros((n,), jnp.int32)}


def test_remove_modalities_matches_the_protocol_rule():
  batch = _batch()
  keep = jnp.array([[True, False, True]] * 3 + [[False, True, True]] * 3)
  out = remove_modalities(batch, keep, ("a", "b", "c"))
  np.testing.assert_array_equal(out["presence"], keep)
  assert float(jnp.abs(out["inputs"]["b"][:3]).sum()) == 0.0
  assert not bool(out["masks"]["b"][:3].any()) and bool(out["masks"]["b"][3:].all())
  np.testing.assert_array_equal(out["inputs"]["c"], batch["inputs"]["c"])
  # a single row applies to every sample
  row = remove_modalities(batch, jnp.array([True, True, False]), ("a", "b", "c"))
  assert not bool(row["presence"][:, 2].any()) and bool(row["presence"][:, :2].all())


def test_random_presence_rate_and_never_empty():
  rates = jnp.array([0.2, 0.5, 0.7])
  keep = np.asarray(random_presence(jax.random.key(3), 20000, rates))
  assert keep.any(1).all()
  # P(missing) = rate_j, minus the rescues of all-missing samples (prob prod rates / M)
  rescue = np.prod(rates) / 3
  expected = np.asarray(rates) - rescue
  sigma = np.sqrt(expected * (1 - expected) / 20000)
  np.testing.assert_array_less(np.abs((1 - keep.mean(0)) - expected), 5 * sigma)


@pytest.mark.parametrize("convention", dr.CONVENTIONS)
def test_dropout_conventions_keep_their_target_fraction_and_never_empty_a_sample(convention):
  n, m, rate, draws = 16, 3, 0.5, 2000
  keys = jax.random.split(jax.random.key(7), draws)
  keep = np.asarray(jax.jit(jax.vmap(
      lambda k: dr.dropout_presence(k, n, m, rate, convention)))(keys))
  assert keep.any(-1).all()
  kept = keep.mean((1, 2))  # per batch
  target = dr.expected_kept_fraction(n, m, rate, convention)
  if convention == "cell_eta":  # exact in every batch: round(0.5 * 16 * 3) = 24 cells off
    np.testing.assert_array_equal(kept, 0.5)
  if convention == "sample_eta":  # exactly round(rate * n) samples hit in every batch
    np.testing.assert_array_equal((~keep.all(-1)).sum(-1), 8)
  if convention == "mmdrop":  # a batch is untouched or every sample lost exactly one
    assert np.all((keep.sum(-1) == 3).all(-1) | (keep.sum(-1) == 2).all(-1))
  assert abs(kept.mean() - target) <= 5 * kept.std() / np.sqrt(draws) + 1e-7, (kept.mean(),
                                                                               target)


def _tiny_model_and_batch(n=8):
  from flax import nnx

  from modalimmune_jax import data
  from modalimmune_jax.model import MultimodalModel
  shapes = {"a": (1, 4), "b": (1, 3), "c": (1, 2)}
  ds = data.make_synthetic((n, 2, 2), shapes=shapes, seed=0)
  graphdef, params = nnx.split(MultimodalModel(shapes, "classification", ds.num_outputs,
                                               hidden=8, num_heads=2, rngs=nnx.Rngs(0)))
  batch = {k: v for k, v in ds.splits["train"].batch(np.arange(n)).items() if k != "index"}
  return ModelFns(graphdef, tuple(shapes), "classification"), params, jax.tree.map(
      jnp.asarray, batch)


def test_dropout_independent_default_is_unchanged_bit_for_bit():
  """The default convention is today's draw: random_presence on the first half
  of the split key, the rest of the loss as before."""
  model, params, batch = _tiny_model_and_batch()
  rates = jnp.array([0.2, 0.5, 0.5], jnp.float32)
  key = jax.random.key(3)
  np.testing.assert_array_equal(dr.dropout_presence(key, 8, 3, (0.2, 0.5, 0.5)),
                                random_presence(key, 8, rates))

  @jax.jit  # one program (eager dispatch of the model costs more than its compile)
  def both(params, batch):
    got, _, metrics = dr.modality_dropout(model, (0.2, 0.5, 0.5)).loss(params, (), batch, key)
    k_mask, k_model = jax.random.split(key)
    dropped = remove_modalities(batch, random_presence(k_mask, 8, rates), model.names)
    expect, _, _ = supervised_loss(model, params, dropped, k_model, 1.0)
    return got, expect, metrics["kept_fraction"], jnp.mean(dropped["presence"])

  got, expect, kept, expect_kept = both(params, batch)
  assert float(got) == float(expect) and float(kept) == float(expect_kept)


def test_dropout_convention_config_errors_name_the_key():
  from modalimmune_jax import methods, schema
  assert schema.rules(dr.Settings)["convention"].choices == dr.CONVENTIONS
  config = with_overrides(base_config(), {"method.name": "dropout"})
  with pytest.raises(ConfigError, match="'method.dropout.convention'"):
    validate_config(with_overrides(config, {"method.dropout.convention": "per_batch"}))
  with pytest.raises(ConfigError, match="'method.dropout.rates'"):
    validate_config(with_overrides(config, {"method.dropout.convention": "cell_eta",
                                            "method.dropout.rates": (0.1, 0.2, 0.3)}))
  model = ModelFns(None, ("a", "b", "c"), "classification")
  with pytest.raises(ConfigError, match="'method.dropout.rate'.*0.6667"):
    methods.from_config(with_overrides(config, {"method.dropout.convention": "cell_eta",
                                                "method.dropout.rate": 0.9}), model, None)
  assert methods.from_config(with_overrides(config, {"method.dropout.convention": "sample_eta"}),
                             model, None).name == "dropout"


def test_controller_moves_toward_the_modality_the_model_leans_on():
  # The "model": prediction from modality 0 only; removing 0 costs, removing 1, 2 does not.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
  y = 2.0 * x[:, 0]

  def loss_of(keep):
    pred = 2.0 * jnp.where(keep[0], x[:, 0], 0.0) + 0.0 * x[:, 1:].sum(1)
    return jnp.mean((pred - y) ** 2)

  state = ctrl.init(3)
  np.testing.assert_allclose(state.alpha, 1 / 3)
  history = []
  for _ in range(5):
    ig = ctrl.information_gain(loss_of, 3)
    state = jax.jit(lambda s, g: ctrl.update(s, g, decay=0.9, tau=0.5, explore=0.1))(state, ig)
    history.append(float(state.alpha[0]))
  assert float(ig[0]) > 1.0 and abs(float(ig[1])) < 1e-6 and abs(float(ig[2])) < 1e-6
  assert int(jnp.argmax(state.alpha)) == 0
  assert history[0] > 1 / 3
  np.testing.assert_allclose(float(state.alpha.sum()), 1.0, rtol=1e-6)
  assert float(state.alpha.min()) >= 0.1 / 3 - 1e-7  # exploration floor
  # a uniform IG keeps uniform intensities
  flat = ctrl.update(ctrl.init(3), jnp.ones(3), decay=0.9, tau=0.5, explore=0.1)
  np.testing.assert_allclose(flat.alpha, 1 / 3, rtol=1e-6)


def test_controller_skips_non_finite_statistics():
  state = ctrl.update(ctrl.init(2), jnp.array([1.0, 0.0]), decay=0.5, tau=1.0, explore=0.0)
  bad = ctrl.update(state, jnp.array([jnp.nan, 0.0]), decay=0.5, tau=1.0, explore=0.0)
  for a, b in zip(jax.tree.leaves(bad._replace(ig=state.ig)), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert np.isnan(bad.ig[0])  # shown, for the train step to count


def test_local_rows_split_a_global_draw_exactly():
  devices = jax.devices()[:1]
  mesh = jax.sharding.Mesh(np.array(devices), ("d",))
  x = jnp.arange(8.0)
  f = jax.shard_map(lambda v: local_rows(x, "d") + 0 * v, mesh=mesh,
                    in_specs=jax.sharding.PartitionSpec("d"),
                    out_specs=jax.sharding.PartitionSpec("d"))
  np.testing.assert_array_equal(f(jnp.zeros(8)), x)
  np.testing.assert_array_equal(local_rows(x, None), x)


def test_intervention_hook_collapses_or_drops_the_target():
  z = jax.random.normal(jax.random.key(0), (32, 3, 8))
  present = jnp.ones((32, 3), bool)
  hook = mi._intervention_hook("collapse", jnp.array(True), jnp.array(1), 0.5, None)
  z2, p2 = hook(z, present)
  np.testing.assert_array_equal(z2[:, 0], z[:, 0])
  np.testing.assert_array_equal(z2[:, 2], z[:, 2])
  # the hook computes the view inside a lax.cond (a compiled branch), the oracle
  # op by op: float32 rounding of the projection differs
  np.testing.assert_allclose(z2[:, 1], spectral.collapsed_view(z[:, 1], 0.5), rtol=1e-5,
                             atol=1e-6)
  assert float(spectral.effective_rank(z2[:, 1])) < float(spectral.effective_rank(z[:, 1]))
  np.testing.assert_array_equal(p2, present)
  off, _ = mi._intervention_hook("collapse", jnp.array(False), jnp.array(1), 0.5, None)(z, present)
  np.testing.assert_array_equal(off, z)
  z3, p3 = mi._intervention_hook("drop", jnp.array(True), jnp.array(2), 0.5, None)(z, present)
  np.testing.assert_array_equal(z3, z)
  assert not bool(p3[:, 2].any()) and bool(p3[:, :2].all())
  keep = jax.random.bernoulli(jax.random.key(1), 0.5, (32, 3))
  z4, p4 = mi._intervention_hook("drop_cells", jnp.array(False), jnp.array(0), 0.5, None,
                                 keep)(z, present)
  np.testing.assert_array_equal(z4, z)
  np.testing.assert_array_equal(p4, keep)


def test_meta_parametrisation_round_trips():
  phi = mi.unconstrain(0.3, 0.85, 0.05, 2.0)
  meta = mi.constrain(phi)
  for k, v in {"lambda": 0.3, "kappa": 0.85, "eta": 0.05, "mu": 2.0}.items():
    np.testing.assert_allclose(float(meta[k]), v, rtol=1e-5)


@pytest.mark.usefixtures("x64")
def test_one_hyper_step_lowers_the_outer_loss_where_the_answer_is_known():
  """Ridge regression tuned by one BHGD step (CG, damped Gauss-Newton, certified):
  the outer (validation) loss goes down, towards the known optimum of log lambda."""
  from modalimmune_jax.hypergrad import GaussNewton, neumann_hypergrad
  rng = np.random.default_rng(0)
  w_true = rng.normal(size=8)
  x, xv = rng.normal(size=(40, 8)), rng.normal(size=(200, 8))
  y = x @ w_true + 1.5 * rng.normal(size=40)
  yv = xv @ w_true + 1.5 * rng.normal(size=200)

  def solve(h):  # the exact inner minimiser
    lam = np.exp(h)
    return np.linalg.solve(x.T @ x / 40 + lam * np.eye(8), x.T @ y / 40)

  def outer_value(h):
    return float(np.mean((xv @ solve(h) - yv) ** 2) / 2)

  inner = GaussNewton(lambda w, h, x, y: (x @ w, w),
                      lambda o, h, x, y: jnp.mean((o[0] - y) ** 2) / 2
                      + jnp.exp(h) / 2 * jnp.sum(o[1] ** 2))
  outer = lambda w, h, xv, yv: jnp.mean((xv @ w - yv) ** 2) / 2
  grid = np.linspace(-8, 3, 400)
  best = grid[np.argmin([outer_value(h) for h in grid])]
  h0 = best + 2.0  # too much regularisation: the hyper-gradient must point down
  g, cert = neumann_hypergrad(inner, outer, jnp.asarray(solve(h0)), jnp.asarray(h0),
                              inner_args=(x, y), outer_args=(xv, yv), solver="cg",
                              damping=1e-6, num_terms=8)
  assert bool(cert.certified) and not bool(cert.diverging)
  opt = optax.sgd(0.5)
  update, _ = opt.update(g, opt.init(jnp.asarray(h0)))
  h1 = float(optax.apply_updates(jnp.asarray(h0), update))
  assert h1 < h0 and outer_value(h1) < outer_value(h0)
  assert abs(h1 - best) < abs(h0 - best)
