import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from modalimmune_jax import curvature


def _problem(seed):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {"w": jax.random.normal(k1, (3, 2)), "b": jax.random.normal(k2, (2,))}
  x = jax.random.normal(k3, (7, 3))

  def f(p, x):
    return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2) + 0.1 * jnp.sum(p["w"] ** 4)
  return f, params, x


def _flat_hessian(f, params, x):
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  return jax.hessian(lambda v: f(unravel(v), x))(flat), flat, unravel


@pytest.mark.parametrize("seed", range(3))
def test_hvp_matches_dense_hessian(seed):
  f, params, x = _problem(seed)
  hess, flat, unravel = _flat_hessian(f, params, x)
  v = jax.random.normal(jax.random.key(seed + 10), flat.shape)
  hv = curvature.hvp(f, params, unravel(v), x)
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(hv)[0], hess @ v,
                             rtol=1e-4, atol=1e-5)
  hv2 = curvature.hvp_operator(f, params, x)(unravel(v))
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(hv2)[0], hess @ v,
                             rtol=1e-4, atol=1e-5)


def test_hutchinson_converges_to_diagonal():
  f, params, x = _problem(0)
  hess, flat, unravel = _flat_hessian(f, params, x)
  exact = jnp.diag(hess)
  errors = []
  for n in (4, 64, 1024):
    est = curvature.hutchinson_diagonal(f, params, jax.random.key(1), n, x)
    errors.append(float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(est)[0] - exact)))
  off = float(jnp.sqrt(jnp.sum(hess ** 2) - jnp.sum(exact ** 2)))
  assert errors[2] < errors[0]
  assert errors[2] < 4 * off / np.sqrt(1024)  # within 4 standard deviations
  # a diagonal Hessian is recovered exactly by one probe
  g = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 4.0) * w ** 2)
  np.testing.assert_allclose(
      curvature.hutchinson_diagonal(g, jnp.zeros(3), jax.random.key(0), 1), [1, 2, 3])


def test_a_masked_refresh_probes_only_the_chosen_leaves():
  """With ``mask`` the probe is over the chosen leaves alone: the diagonal of
  their Hessian block, exact from one probe when that block is diagonal even
  though the cross block is not (a probe over every leaf would carry the cross
  terms); the other leaves keep their state and pass unchanged."""
  da, db = jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 5.0])
  cross = jnp.arange(1.0, 7.0).reshape(3, 2)
  f = lambda p: (0.5 * jnp.sum(da * p["a"] ** 2) + p["a"] @ cross @ p["b"]
                 + 0.5 * jnp.sum(db * p["b"] ** 2))
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  hess, *_ = _flat_hessian(lambda p, _: f(p), params, None)
  tx = curvature.curvature_mask("soft", beta=1.0, refresh_every=1, ema_decay=0.0,
                                mask={"a": True, "b": False})
  state = tx.init(params)
  g = {"a": jnp.ones(3), "b": jnp.ones(2)}
  upd, state = tx.update(g, state, params, obj_fn=f)
  np.testing.assert_allclose(state.diag_ema["a"], jnp.diag(hess)[:3], rtol=1e-6)
  np.testing.assert_array_equal(state.diag_ema["b"], 0.0)
  np.testing.assert_allclose(upd["a"], 1.0 / (1.0 + da), rtol=1e-6)
  np.testing.assert_array_equal(upd["b"], g["b"])
  # without the mask one probe is off by the cross terms
  full = curvature.curvature_mask("soft", refresh_every=1, ema_decay=0.0)
  _, st = full.update(g, full.init(params), params, obj_fn=f)
  assert np.abs(np.asarray(st.diag_ema["a"]) - np.asarray(da)).max() > 0.5


def _quadratic(diag):
  return lambda p: 0.5 * jnp.sum(diag * p ** 2)


def test_hard_mask_zeroes_high_curvature_coordinates():
  diag = jnp.arange(1.0, 11.0)
  obj = _quadratic(diag)
  tx = curvature.curvature_mask("hard", quantile=0.7, refresh_every=5)
  params = jnp.ones(10)
  state = tx.init(params)
  upd, state = jax.jit(lambda u, s, p: tx.update(u, s, p, obj_fn=obj))(
      jnp.ones(10), state, params)
  # Hutchinson is exact on a diagonal Hessian: coords above the 0.7 quantile go
  np.testing.assert_array_equal(upd, (diag <= jnp.quantile(diag, 0.7)).astype(float))


def test_soft_mask_and_destructive_part():
  diag = jnp.array([0.0, 1.0, 3.0])
  tx = curvature.curvature_mask("soft", beta=2.0)
  params = jnp.zeros(3)
  state = tx.init(params)
  g = jnp.array([1.0, 1.0, 1.0])
  d = jnp.array([0.5, 0.5, 0.5])
  upd, _ = tx.update(g, state, params, obj_fn=_quadratic(diag), destructive=d)
  np.testing.assert_allclose(upd, 0.5 + 0.5 / (1 + 2 * diag), rtol=1e-6)


def test_refresh_schedule_and_ema():
  tx = curvature.curvature_mask("soft", beta=1.0, refresh_every=3, ema_decay=0.5)
  params = jnp.zeros(2)
  state = tx.init(params)
  seen = []
  for step in range(7):
    curv = 1.0 if step < 3 else 3.0
    fn = lambda p, c=curv: 0.5 * c * jnp.sum(p ** 2)
    _, state = tx.update(jnp.ones(2), state, params, obj_fn=fn)
    seen.append(int(state.num_refreshes))
  assert seen == [1, 1, 1, 2, 2, 2, 3]
  # EMA after refreshes with h=1, 3, 3 and decay .5, debiased: (0.125+0.75+1.5)/0.875
  expected_h = (0.5 ** 2 * 0.5 * 1 + 0.5 * 0.5 * 3 + 0.5 * 3) / (1 - 0.5 ** 3)
  np.testing.assert_allclose(state.scale, 1 / (1 + expected_h), rtol=1e-5)


def test_composes_with_adam_under_jit():
  """In an optax chain under jit the mask acts on what Adam receives: after the
  first update exactly the masked coordinates (scale 0) stay where they were
  (Adam's first step moves every coordinate with a non-zero gradient), and the
  loss still falls."""
  f, params, x = _problem(1)
  opt = optax.chain(curvature.curvature_mask("hard", quantile=0.5, refresh_every=2),
                    optax.adam(1e-2))
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss = lambda p: f(p, x)
    g = jax.grad(loss)(params)
    u, state = opt.update(g, state, params, obj_fn=loss)
    return optax.apply_updates(params, u), state

  before = float(f(params, x))
  first, state = step(params, state)
  masked = jax.tree.map(lambda s: np.asarray(s) == 0.0, state[0].scale)
  moved = jax.tree.map(lambda a, b: np.asarray(a) != np.asarray(b), first, params)
  flat_masked = np.concatenate([m.ravel() for m in jax.tree.leaves(masked)])
  assert 0 < flat_masked.sum() < flat_masked.size  # the mask masks some, not all
  for m, mv in zip(jax.tree.leaves(masked), jax.tree.leaves(moved)):
    np.testing.assert_array_equal(mv, ~m)
  params = first
  for _ in range(19):
    params, state = step(params, state)
  assert float(f(params, x)) < before


def test_errors_are_clear():
  tx = curvature.curvature_mask()
  state = tx.init(jnp.zeros(2))
  with pytest.raises(ValueError, match="obj_fn"):
    tx.update(jnp.zeros(2), state, jnp.zeros(2))
  with pytest.raises(ValueError, match="mode"):
    curvature.curvature_mask("medium")


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.7, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_hard_scale_equals_quantile_rule(q, n):
  """The top-k threshold keeps exactly the coordinates with |h| <= quantile_q(|h|)."""
  rng = np.random.default_rng(n)
  h = rng.normal(size=n).astype(np.float32)
  h[: n // 3] = h[n // 3: 2 * (n // 3)]  # ties
  [got] = curvature._scales([jnp.asarray(h)], "hard", q, 1.0)
  want = (np.abs(h) <= np.quantile(np.abs(h), q)).astype(np.float32)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 1.0])
def test_hard_scales_of_several_leaves_in_one_loop(q):
  """One bisection for leaves of different sizes and scales gives each leaf's own rule."""
  rng = np.random.default_rng(7)
  hs = [rng.normal(size=n).astype(np.float32) * 10.0 ** e
        for n, e in [(1, 0), (2, -3), (7, 2), (100, 0), (1001, -1), (64, 5)]]
  hs[3][:30] = hs[3][30:60]  # ties
  got = curvature._scales([jnp.asarray(h) for h in hs], "hard", q, 1.0)
  for h, g in zip(hs, got):
    np.testing.assert_array_equal(g, (np.abs(h) <= np.quantile(np.abs(h), q)).astype(np.float32))
