"""``modalimmune_jax.linalg``: jnp.linalg's values, and no LAPACK batch added by vmap.

The second property is what keeps vmapped seeds from deadlocking jaxlib's CPU
LAPACK kernels (see the module docstring); it is checked on the lowered
program, where a batched call shows as a LAPACK custom call of higher rank.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modalimmune_jax import linalg, spectral, train
from modalimmune_jax.config import with_overrides
from modalimmune_jax.step import SEED_AXES, device_batch, make_train_step, stack_states
from tests.helpers import get_config


def lapack_operands(fn, *args):
  """The operand shapes of the LAPACK custom calls in ``jit(fn)(*args)`` lowered
  for CPU (a set: how often a call appears depends on how functions are outlined)."""
  text = jax.jit(fn).lower(*args).as_text()
  calls = re.findall(r"custom_call @lapack_\w+\((.*)", text)
  assert len(calls) == text.count("@lapack_"), "unparsed LAPACK call"
  return {re.search(r": \(tensor<((?:\d+x)*)", c).group(1).rstrip("x") for c in calls}


def psd(shape, seed=0):
  a = jax.random.normal(jax.random.key(seed), shape)
  return a @ jnp.swapaxes(a, -1, -2)


@pytest.mark.parametrize("fn, ref", [
    (linalg.eigvalsh, jnp.linalg.eigvalsh),
    (linalg.svdvals, lambda a: jnp.linalg.svd(a, compute_uv=False)),
    (linalg.eigh, lambda a: jnp.linalg.eigh(a, symmetrize_input=False)),
])
def test_values_are_jnp_linalg_s_with_and_without_vmap(fn, ref):
  a = psd((3, 2, 5, 5))
  want = ref(a)
  for got in (fn(a), jax.vmap(fn)(a), jax.jit(jax.vmap(jax.vmap(fn)))(a),
              jax.vmap(fn, in_axes=1, out_axes=1)(a)):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_vmap_adds_no_batched_lapack_call():
  a = psd((4, 6, 6))
  assert lapack_operands(jax.vmap(jnp.linalg.eigvalsh), a) == {"4x6x6"}  # what it avoids
  for fn in (linalg.eigvalsh, linalg.svdvals, linalg.eigh):
    assert lapack_operands(jax.vmap(fn), a) == {"6x6"}
    assert lapack_operands(jax.vmap(jax.vmap(fn)), a[None]) == {"6x6"}
    assert lapack_operands(fn, a) == {"4x6x6"}  # an explicit batch stays one call


def test_no_gradient_flows_and_spectral_derivatives_still_work():
  a = psd((5, 5))
  assert not np.any(jax.grad(lambda x: linalg.eigvalsh(x).sum())(a))
  z = jax.random.normal(jax.random.key(1), (3, 8, 4))
  rank = lambda x: spectral.effective_rank(x)
  h = jax.jit(jax.vmap(jax.hessian(rank)))(z)
  np.testing.assert_allclose(h[1], jax.hessian(rank)(z[1]), rtol=1e-4, atol=1e-5)


def test_modalimmune_seeds_program_has_the_one_seed_program_s_lapack_calls():
  """Vmapping two seeds of ModalImmune's step (hyper-step included) adds no
  LAPACK batch: three such seeds deadlocked on this 2-core CPU before."""
  config = with_overrides(get_config("synthetic"), {"method.name": "modalimmune"})
  run = train.setup(config, num_devices=1)
  step = make_train_step(run.method, run.optimizer)
  batch = device_batch(run.batches(0))
  rng = jax.random.key(0)
  one = lapack_operands(step, run.state, batch, rng)
  assert one, "no LAPACK call: the check would be empty"
  seeds = lambda s, b, r: jax.vmap(step, in_axes=(SEED_AXES, 0, 0))(s, b, r)
  stacked = jax.tree.map(lambda *x: jnp.stack(x), batch, batch)
  two = lapack_operands(seeds, stack_states([run.state, run.state]), stacked,
                        jnp.stack([rng, rng]))
  assert two == one
