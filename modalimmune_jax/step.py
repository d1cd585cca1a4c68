"""The pure training step and its data-parallel form.

One :class:`TrainState` (step, params, optimiser state, method state) goes in
and out of every step; everything is a pure function of it:

* :func:`make_train_step` ``(state, batch, rng) -> (state, metrics)``, for any
  :class:`~modalimmune_jax.methods.base.Method` and any optax chain. The
  objective of the batch is passed to ``optimizer.update`` as the extra
  argument ``obj_fn`` (as ``optax.contrib.sophia`` expects) and, for methods
  with ``split_destructive``, the gradient of the destructive part as
  ``destructive``. A non-finite loss or gradient leaves params and optimiser
  state unchanged and is counted (``metrics["nonfinite"]``).
* :func:`make_parallel_step`: ``jax.jit`` of ``jax.shard_map`` over a 1-D mesh
  axis ``"data"``; the global batch is split across devices, the state is
  replicated, losses and metrics are averaged with ``lax.pmean``. The same
  code runs on 1 or N devices and across processes (``jax.distributed``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from modalimmune_jax.methods.base import Method

__all__ = ["AXIS", "TrainState", "init_state", "make_train_step", "make_mesh",
           "make_parallel_step", "device_batch", "shard_batch", "host_copy"]

AXIS = "data"


class TrainState(NamedTuple):
  """Everything a step changes; orbax checkpoints it in one piece."""
  step: jax.Array
  params: Any
  opt_state: Any
  method_state: Any


def init_state(params, optimizer: optax.GradientTransformation, method: Method) -> TrainState:
  """The state at step 0. Every leaf is its own buffer (an ``init`` may reuse one
  array in several places, which a donating step cannot take)."""
  state = TrainState(jnp.zeros([], jnp.int32), params, optimizer.init(params),
                     method.init(params))
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(method: Method, optimizer: optax.GradientTransformation,
                    axis_name: str | None = None) -> Callable:
  """``step(state, batch, rng) -> (state, metrics)``.

  With ``axis_name`` (inside ``shard_map``) the objective is the device mean
  of the local losses, ``lax.pmean(loss, axis_name)``, and that is what is
  differentiated: with replicated params ``shard_map`` sums the per-device
  cotangents, so the gradient is exactly the global-batch mean gradient (a
  ``pmean`` of local gradients on top would count it N times). ``rng`` is
  passed to the method unchanged (the same on every device).

  The destructive split: the method's loss returns ``(total, destructive)``;
  one ``jax.vjp`` and a ``vmap`` of its pullback over the two cotangents
  ``(1, 0)`` and ``(0, 1)`` give both gradients from one forward pass (the
  backward pass runs batched over two cotangents).
  """

  def step(state: TrainState, batch, rng):
    params = state.params

    def objective(p):
      total, destructive, metrics = method.loss(p, state.method_state, batch, rng, axis_name)
      losses = (total, jnp.asarray(destructive, jnp.result_type(total)))
      if axis_name is not None:
        losses, metrics = jax.lax.pmean((losses, metrics), axis_name)
      return losses, metrics

    extra = {}
    if method.split_destructive:
      losses, pullback, metrics = jax.vjp(objective, params, has_aux=True)
      basis = (jnp.array([1.0, 0.0], losses[0].dtype), jnp.array([0.0, 1.0], losses[0].dtype))
      (both,) = jax.vmap(pullback)(basis)
      grads = jax.tree.map(lambda g: g[0], both)
      extra["destructive"] = jax.tree.map(lambda g: g[1], both)
    else:
      def total_objective(p):
        losses, metrics = objective(p)
        return losses[0], (losses, metrics)
      (_, (losses, metrics)), grads = jax.value_and_grad(total_objective, has_aux=True)(params)
    loss = losses[0]

    def constructive(p):  # the objective the curvature mask measures: no destructive part
      if method.objective is not None:
        value = method.objective(p, state.method_state, batch, rng, axis_name)
        return value if axis_name is None else jax.lax.pmean(value, axis_name)
      (total, destructive), _ = objective(p)
      return total - destructive

    def apply(_):
      updates, new_opt_state = optimizer.update(grads, state.opt_state, params,
                                                obj_fn=constructive, **extra)
      return optax.apply_updates(params, updates), new_opt_state

    # lax.cond rather than a per-leaf select: same result, half the XLA
    # compile time on CPU (one select kernel per leaf of params and state).
    finite = _all_finite((loss, grads))
    new_params, new_opt_state = jax.lax.cond(finite, apply, lambda _: (params, state.opt_state),
                                             None)
    method_state, method_metrics = method.update(state.method_state, new_params, batch, rng,
                                                 state.step, axis_name)
    metrics = dict(metrics, **method_metrics, loss=loss,
                   nonfinite=1.0 - finite.astype(jnp.float32),
                   grad_norm=optax.tree.norm(grads))
    return TrainState(state.step + 1, new_params, new_opt_state, method_state), metrics

  return step


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-D mesh ``("data",)`` over ``num_devices`` devices (0 = all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices, have {len(devices)}")
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.array(devices), (AXIS,))


def make_parallel_step(method: Method, optimizer: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh) -> Callable:
  """The data-parallel step: ``jit(shard_map(step))`` over the mesh axis ``data``.

  The state and the key are replicated; every leaf of the batch is split
  along its first axis. The state is donated.
  """
  step = make_train_step(method, optimizer, axis_name=AXIS)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                          out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=(0,))


def device_batch(batch: dict) -> dict:
  """The arrays of a host batch that the step consumes (no sample index)."""
  return {k: v for k, v in batch.items() if k != "index"}


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Places a *global* host batch on the mesh, split along the batch axis.

  With several processes each one passes the same global batch and
  contributes only its own contiguous rows
  (``jax.make_array_from_process_local_data``).
  """
  sharding = NamedSharding(mesh, P(AXIS))
  n_proc, pid = jax.process_count(), jax.process_index()
  if n_proc == 1:
    return jax.device_put(batch, sharding)

  def put(x):
    rows = x.shape[0] // n_proc
    return jax.make_array_from_process_local_data(sharding, x[pid * rows:(pid + 1) * rows],
                                                  x.shape)
  return jax.tree.map(put, batch)


def host_copy(tree):
  """Host copies of replicated (possibly multi-process) arrays (typed PRNG keys
  stay single-device JAX arrays: numpy has no key dtype)."""
  def copy(x):
    if not isinstance(x, jax.Array):
      return x
    local = x.addressable_data(0)
    return local if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(local)
  return jax.tree.map(copy, tree)
