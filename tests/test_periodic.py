"""The speed paths of issue 17 compute what the slow ones did.

* ModalImmune's periodic work (curvature refresh, controller, hyper-step) runs
  as programs of its own: the step's program holds none of it, and a
  non-finite periodic result is skipped and counted (the device pipeline,
  periodic programs on gathered batches, equals the host pipeline bit for bit:
  ``tests/test_modalimmune_train.py``, with a resume).
* The destructive gradient through the encoders (``Method.destructive``)
  equals the second cotangent of the whole model's backward pass.
* Mixed precision: bfloat16 compute with float32 parameters, optimiser state,
  spectra and BHGD (its certificate in float32), close to float32 training.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modalimmune_jax import train
from modalimmune_jax.config import with_overrides
from modalimmune_jax.methods.base import Periodic
from modalimmune_jax.methods.modalimmune import Settings, bhgd_objectives
from modalimmune_jax.step import fault_names, host_copy, make_train_step, shard_batch
from tests.helpers import flat, get_config


def small_config(**overrides):
  config = get_config("synthetic", "smoke")
  mi = config.method.modalimmune
  mi.ctrl_every, mi.hyper_every, mi.mask_every = 2, 3, 2
  mi.hyper_terms, mi.hyper_batch_size = 4, 16
  config.method.name = "modalimmune"
  config.checkpoint.enabled = False
  config.eval.removals, config.eval.missing_rates, config.eval.snrs_db = "none", (), ()
  return with_overrides(config, overrides)


def _primitives(jaxpr):
  """Every primitive of ``jaxpr`` and of the jaxprs in its equations' params."""
  out = set()
  for eqn in jaxpr.eqns:
    out.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          out |= _primitives(sub)
  return out


def test_the_step_program_holds_no_periodic_work():
  """The hyper-step's solve (a while loop) and the controller's M + 1 passes
  are in programs of their own; the step has neither, nor a cond for them."""
  run = train.setup(small_config(), num_devices=1)
  batch = shard_batch(run.batches(0), run.mesh)
  rng = jax.random.key(0)
  step = make_train_step(run.method, run.optimizer)
  prims = _primitives(jax.make_jaxpr(step)(run.state, batch, rng).jaxpr)
  assert "while" not in prims
  periodic = {p.fn.__name__: p for p in run.method.periodic}
  assert set(periodic) == {"refresh", "measure", "bhgd"}
  assert periodic["refresh"].before and not periodic["bhgd"].before
  assert [s for s in range(10) if periodic["bhgd"].fires(s)] == [2, 5, 8]  # after s+1 % 3 == 0
  bhgd = [fn for p, fn in run.step_fn.periodic if p.fn.__name__ == "bhgd"][0]
  hyper_prims = _primitives(jax.make_jaxpr(bhgd)(run.state, batch, rng).jaxpr)
  assert "while" in hyper_prims


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """ModalImmune (every periodic part firing) trained in float32 and in bfloat16."""
  return {dtype: train.train_and_evaluate(small_config(**{"train.compute_dtype": dtype}),
                                          str(tmp_path_factory.mktemp(dtype)))
          for dtype in ("float32", "bfloat16")}


def test_a_nonfinite_periodic_result_is_skipped_and_counted():
  """A periodic program whose method state goes non-finite leaves the state as
  it was and counts the step (Health), naming the term."""
  run = train.setup(small_config(), num_devices=1)

  def poison(params, opt_state, state, batch, rng, step, axis_name=None):
    bad = state.controller._replace(ig=state.controller.ig * jnp.nan)
    return opt_state, state._replace(controller=bad), {}

  method = run.method._replace(periodic=(Periodic(2, poison),))
  run = train.setup(small_config(), method=lambda fns: method, num_devices=1)
  state = run.state
  before = host_copy(state.method_state.controller)
  rng = jax.random.key(0)
  for s in range(3):
    state, _ = run.step_fn(state, shard_batch(run.batches(s), run.mesh),
                           jax.random.fold_in(rng, s), s)
  health = host_copy(state.health)
  assert int(health.skipped) == 2 and int(health.last_bad) == 2  # after steps 0 and 2
  terms = fault_names(run.method, run.state.method_state)
  assert terms[int(np.log2(int(health.terms)))] == "controller information gain"
  np.testing.assert_array_equal(host_copy(state.method_state.controller).ig, before.ig)


def test_destructive_gradient_through_the_encoders_equals_the_full_backward():
  run = train.setup(small_config(**{"method.modalimmune.interventions": False}), num_devices=1)
  m, state = run.method, run.state
  batch = shard_batch(run.batches(0), run.mesh)
  rng = jax.random.key(3)

  def objective(p):
    total, destructive, _ = m.loss(p, state.method_state, batch, rng)
    return total, destructive

  @jax.jit
  def both(params):
    _, pullback = jax.vjp(objective, params)
    (full,) = pullback((jnp.zeros(()), jnp.ones(())))
    return full, jax.grad(lambda p: m.destructive(p, state.method_state, batch, rng))(params)

  full, direct = both(state.params)
  np.testing.assert_allclose(flat(direct), flat(full), rtol=1e-5, atol=1e-8)
  assert np.abs(flat(direct)).max() > 0
  # it reaches the encoders alone, so the curvature mask probes only them
  # (ModelFns.encoder_leaves): nothing is lost on the other leaves
  on = jax.tree.leaves(run.model.encoder_leaves(state.params))
  grads = [np.asarray(g) for g in jax.tree.leaves(full)]
  assert any(on) and not all(on)
  assert all(np.abs(g).max() > 0 for g, e in zip(grads, on) if e and g.size > 1)
  assert all(not g.any() for g, e in zip(grads, on) if not e)


def test_bfloat16_compute_keeps_float32_state_and_certificates(trained):
  run = train.setup(small_config(**{"train.compute_dtype": "bfloat16"}), num_devices=1)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(run.state.params))
  batch = shard_batch(run.batches(0), run.mesh)
  step = make_train_step(run.method, run.optimizer)
  assert "bf16" in str(jax.make_jaxpr(step)(run.state, batch, jax.random.key(0)))
  gn, _ = bhgd_objectives(run.model.in_float32(), Settings())
  train_batch = host_copy(run.state.method_state.hyper_data)[0]
  alpha = jnp.full((3,), 1 / 3)
  text = str(jax.make_jaxpr(lambda p: gn.model_fn(p, None, train_batch, alpha))(
      run.state.params))
  assert "bf16" not in text  # BHGD's model (its solve and certificate) in float32
  half, full = trained["bfloat16"], trained["float32"]
  ms = host_copy(half["final_state"].method_state)
  assert int(ms.hyper.applied + ms.hyper.rejected) == 4
  assert 0 < float(ms.hyper.error_bound) < np.inf and not bool(ms.hyper.diverging)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(half["final_state"].opt_state)
             if jnp.issubdtype(x.dtype, jnp.floating))
  a, b = flat(full["final_params"]), flat(half["final_params"])
  assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a))  # close, not equal
  assert not np.array_equal(a, b)
  acc = {name: r["protocol"]["rows"][0]["accuracy"] for name, r in (("f32", full),
                                                                     ("bf16", half))}
  assert abs(acc["f32"] - acc["bf16"]) <= 0.1, acc
