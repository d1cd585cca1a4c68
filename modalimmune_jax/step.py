"""The pure training step and its data-parallel form.

One :class:`TrainState` (step, params, optimiser state, method state) goes in
and out of every step; everything is a pure function of it:

* :func:`make_train_step` ``(state, batch, rng) -> (state, metrics)``, for any
  :class:`~modalimmune_jax.methods.base.Method` and any optax chain. The
  objective of the batch is passed to ``optimizer.update`` as the extra
  argument ``obj_fn`` (as ``optax.contrib.sophia`` expects) and, for methods
  with ``split_destructive``, the gradient of the destructive part as
  ``destructive``.
* Numerical faults are handled inside the step, with no host
  synchronisation: a non-finite loss, gradient or method statistic (each
  field of the method state, or what ``Method.faults`` reports) leaves
  params, optimiser state and method state unchanged, and is counted in
  :class:`Health` (total, run in a row, the last bad step and which terms
  went bad). After ``max_nonfinite`` bad steps in a row the step stops
  changing anything (``Health.halted``); the loop reads the counters at its
  logging intervals and stops with a message naming the step and the terms.
* :func:`make_parallel_step`: ``jax.jit`` of ``jax.shard_map`` over a 1-D mesh
  axis ``"data"``; the global batch is split across devices, the state is
  replicated, losses and metrics are averaged with ``lax.pmean``. The same
  code runs on 1 or N devices and across processes (``jax.distributed``).
* :func:`make_loop_step`: the same step for the training loop. The training
  split lives on the device (:func:`device_data`); the step takes the
  sample indices of ``k`` consecutive global batches, gathers each batch
  inside the compiled program and runs the ``k`` steps with ``lax.scan``
  (one dispatch), with the step's key ``fold_in(base_rng, state.step)``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from modalimmune_jax.methods.base import Method, Periodic, all_finite, has_floats

__all__ = ["AXIS", "TrainState", "Health", "SEED_AXES", "init_state", "make_train_step",
           "make_periodic_step", "make_mesh", "make_parallel_step", "make_loop_step",
           "make_parallel_periodic", "StepFn", "fault_names", "device_data",
           "split_arrays",
           "gather_batch", "device_batch", "shard_batch", "shard_indices", "host_copy",
           "stack_states", "seed_state"]

AXIS = "data"


class Health(NamedTuple):
  """Non-finite bookkeeping, kept in the train state (int32 scalars).

  Attributes:
    skipped: steps whose update was not applied, in total.
    run: bad steps in a row up to now.
    last_bad: index of the last bad step (-1 if none).
    terms: bit ``i`` set if term ``i`` of :func:`fault_names` was non-finite
      at ``last_bad``.
    halted: 1 once ``run`` reached ``max_nonfinite``; from then on no step
      changes anything.
  """
  skipped: jax.Array
  run: jax.Array
  last_bad: jax.Array
  terms: jax.Array
  halted: jax.Array

  @classmethod
  def zeros(cls) -> "Health":
    z = lambda v=0: jnp.array(v, jnp.int32)
    return cls(z(), z(), z(-1), z(), z())


class TrainState(NamedTuple):
  """Everything a step changes; orbax checkpoints it in one piece."""
  step: jax.Array
  params: Any
  opt_state: Any
  method_state: Any
  health: Health = None

  @classmethod
  def create(cls, params, opt_state, method_state) -> "TrainState":
    return cls(jnp.zeros([], jnp.int32), params, opt_state, method_state, Health.zeros())


# ``vmap`` axes of a stack of seeds' states: every leaf has a leading seed axis
# except the step counter, which the seeds share. Kept unbatched, the step
# keeps the methods' periodic ``lax.cond(step ...)`` a branch (batched, it would
# be a select that runs both branches every step).
SEED_AXES = TrainState(None, 0, 0, 0, 0)


def stack_states(states) -> TrainState:
  """One :class:`TrainState` of ``S`` seeds at the same step (see :data:`SEED_AXES`)."""
  steps = {int(s.step) for s in states}
  if len(steps) != 1:
    raise ValueError(f"seeds at different steps {sorted(steps)} cannot be stacked")
  rest = jax.tree.map(lambda *xs: jnp.stack(xs), *[tuple(s[1:]) for s in states])
  return TrainState(states[0].step, *rest)


def seed_state(state: TrainState, i: int) -> TrainState:
  """Seed ``i``'s own state out of a stack (:func:`stack_states`)."""
  return TrainState(state.step, *jax.tree.map(lambda x: x[i], tuple(state[1:])))


def init_state(params, optimizer: optax.GradientTransformation, method: Method) -> TrainState:
  """The state at step 0. Every leaf is its own buffer (an ``init`` may reuse one
  array in several places, which a donating step cannot take)."""
  state = TrainState.create(params, optimizer.init(params), method.init(params))
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)


def _method_faults(method: Method, old, new) -> dict[str, jax.Array]:
  """``{term: True if non-finite}`` for the method's statistics after its update."""
  if method.faults is not None:
    return dict(method.faults(old, new))
  if hasattr(new, "_fields"):
    return {f"method_state.{f}": ~all_finite(getattr(new, f)) for f in new._fields
            if has_floats(getattr(new, f))}
  return {"method_state": ~all_finite(new)} if has_floats(new) else {}


def fault_names(method: Method, method_state) -> list[str]:
  """The terms a step (or a periodic program, :func:`make_periodic_step`)
  checks, in the bit order of :attr:`Health.terms`."""
  faults = jax.eval_shape(lambda s: _method_faults(method, s, s), method_state)
  return ["loss", "gradient", "optimizer state", *faults]


def _flat_pair(new, old):
  """The leaves of ``new`` and of ``old`` (a tree of the same structure), and the treedef."""
  new_leaves, treedef = jax.tree.flatten(new)
  return new_leaves, treedef.flatten_up_to(old), treedef


def _moved(new_leaves, old_leaves) -> list[int]:
  """Where a program's output leaf is not the very leaf it was given: what it computed."""
  return [i for i, (a, b) in enumerate(zip(new_leaves, old_leaves)) if a is not b]


def _guard(ok, new, old):
  """``new`` if ``ok`` else ``old``, leaf by leaf; a leaf that ``new`` passed
  through unchanged (the same traced value) is neither selected nor copied
  (a method's constant data, say)."""
  new_leaves, old_leaves, treedef = _flat_pair(new, old)
  moved = _moved(new_leaves, old_leaves)
  if moved:
    # lax.cond rather than a per-leaf select: same result, half the XLA
    # compile time on CPU (one select kernel per leaf)
    picked = jax.lax.cond(ok, lambda: [new_leaves[i] for i in moved],
                          lambda: [old_leaves[i] for i in moved])
    new_leaves = list(new_leaves)
    for i, leaf in zip(moved, picked):
      new_leaves[i] = leaf
  return treedef.unflatten(new_leaves)


def make_train_step(method: Method, optimizer: optax.GradientTransformation,
                    axis_name: str | None = None, max_nonfinite: int = 0) -> Callable:
  """``step(state, batch, rng) -> (state, metrics)``.

  With ``axis_name`` (inside ``shard_map``) the objective is the device mean
  of the local losses, ``lax.pmean(loss, axis_name)``, and that is what is
  differentiated: with replicated params ``shard_map`` sums the per-device
  cotangents, so the gradient is exactly the global-batch mean gradient (a
  ``pmean`` of local gradients on top would count it N times). ``rng`` is
  passed to the method unchanged (the same on every device).

  The destructive split: the method's loss returns ``(total, destructive)``.
  With ``Method.destructive`` (the destructive part alone, reading only part
  of the model) its gradient is taken through that part; without it, one
  ``jax.vjp`` and a ``vmap`` of its pullback over the two cotangents ``(1, 0)``
  and ``(0, 1)`` give both gradients from one forward pass (the backward pass
  through the whole model runs batched over two cotangents).

  ``max_nonfinite`` (0 = never): after that many bad steps in a row the
  state is frozen and ``state.health.halted`` set (see :class:`Health`).
  """

  def step(state: TrainState, batch, rng):
    health = Health.zeros() if state.health is None else state.health
    params = state.params

    def objective(p):
      total, destructive, metrics = method.loss(p, state.method_state, batch, rng, axis_name)
      losses = (total, jnp.asarray(destructive, jnp.result_type(total)))
      if axis_name is not None:
        losses, metrics = jax.lax.pmean((losses, metrics), axis_name)
      return losses, metrics

    extra = {}
    if method.split_destructive and method.destructive is None:
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
      if method.split_destructive:  # through the part of the model it reads
        def destructive(p):
          value = method.destructive(p, state.method_state, batch, rng, axis_name)
          return value if axis_name is None else jax.lax.pmean(value, axis_name)
        extra["destructive"] = jax.grad(destructive)(params)
    loss = losses[0]

    def constructive(p):  # the objective the curvature mask measures: no destructive part
      if method.objective is not None:
        value = method.objective(p, state.method_state, batch, rng, axis_name)
        return value if axis_name is None else jax.lax.pmean(value, axis_name)
      (total, destructive), _ = objective(p)
      return total - destructive

    # The update is computed whatever the gradient; the guard below keeps the
    # old state when anything is non-finite. Only the optimiser state that the
    # update changes goes through the guard (a curvature mask's estimates,
    # refreshed by a program of their own, pass through it untouched).
    updates, new_opt_state = optimizer.update(grads, state.opt_state, params,
                                              obj_fn=constructive, **extra)
    new_params = optax.apply_updates(params, updates)
    bad = [~jnp.all(jnp.isfinite(loss)), ~all_finite(grads), jnp.zeros([], bool)]
    finite = ~(bad[0] | bad[1])
    # the method's update reads the parameters this step leaves (the old ones
    # after a non-finite gradient), so its own faults are its own
    method_state, method_metrics = method.update(
        state.method_state, _guard(finite, new_params, params), batch, rng, state.step,
        axis_name)
    bad += list(_method_faults(method, state.method_state, method_state).values())
    bad = jnp.stack(bad)
    ok = ~jnp.any(bad) & (health.halted == 0)
    new_params, new_opt_state, method_state = _guard(
        ok, (new_params, new_opt_state, method_state),
        (params, state.opt_state, state.method_state))
    health = _count(health, ok, bad, state.step, max_nonfinite)
    metrics = dict(metrics, **method_metrics, loss=loss,
                   nonfinite=1.0 - ok.astype(jnp.float32),
                   grad_norm=optax.tree.norm(grads))
    return TrainState(state.step + 1, new_params, new_opt_state, method_state, health), metrics

  return step


def _count(health: Health, ok, bad, step, max_nonfinite: int, reset: bool = True) -> Health:
  """The health after a step (``ok``: applied; ``bad``: per-term flags);
  ``reset=False`` (a periodic program): an applied one does not end a run of
  bad steps."""
  if_halted = health.halted > 0
  counted = ~ok & ~if_halted
  bits = jnp.sum(jnp.where(bad, 2 ** jnp.arange(bad.shape[0], dtype=jnp.int32), 0))
  run = jnp.where(ok & reset, 0, health.run + counted.astype(jnp.int32))
  halted = if_halted | ((max_nonfinite > 0) & (run >= max(max_nonfinite, 1)))
  return Health(skipped=health.skipped + counted.astype(jnp.int32), run=run,
                last_bad=jnp.where(counted, step, health.last_bad),
                terms=jnp.where(counted, bits.astype(jnp.int32), health.terms),
                halted=halted.astype(jnp.int32))


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-D mesh ``("data",)`` over ``num_devices`` devices (0 = all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices, have {len(devices)}")
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.array(devices), (AXIS,))


def make_periodic_step(method: Method, periodic: Periodic, axis_name: str | None = None,
                       max_nonfinite: int = 0) -> Callable:
  """``periodic_step(state, batch, rng) -> (state, metrics)``: the method's
  :class:`~modalimmune_jax.methods.base.Periodic` work around one step, as
  its own program; ``rng`` and ``batch`` are the step's.

  The step it belongs to is ``state.step`` (before) or ``state.step - 1``
  (after). A non-finite result (the method's faults, or a non-finite
  optimiser state) is not applied and is counted in :class:`Health` like a
  skipped step; an applied one leaves the counters alone. A halted state is
  not changed.
  """
  def run(state: TrainState, batch, rng):
    step = state.step - (0 if periodic.before else 1)
    opt_state, method_state, metrics = periodic.fn(state.params, state.opt_state,
                                                   state.method_state, batch, rng, step,
                                                   axis_name)
    bad = [jnp.zeros([], bool), jnp.zeros([], bool),
           ~all_finite(_computed(state.opt_state, opt_state)),
           *_method_faults(method, state.method_state, method_state).values()]
    bad = jnp.stack(bad)
    ok = ~jnp.any(bad) & (state.health.halted == 0)
    opt_state, method_state = _guard(ok, (opt_state, method_state),
                                     (state.opt_state, state.method_state))
    health = _count(state.health, ok, bad, step, max_nonfinite, reset=False)
    return state._replace(opt_state=opt_state, method_state=method_state, health=health), metrics

  return run


def _computed(old, new) -> list:
  """The leaves of ``new`` that a program computed (:func:`_moved`): a refresh of
  one transformation's state passes the rest of the optimiser state through,
  and those leaves were checked when they were computed."""
  new_leaves, old_leaves, _ = _flat_pair(new, old)
  return [new_leaves[i] for i in _moved(new_leaves, old_leaves)]


def _step_of(state: TrainState):
  return state.step


def _data_parallel(body: Callable, mesh: jax.sharding.Mesh, seeds: bool = False,
                   key_step: Callable = _step_of) -> Callable:
  """``jit(shard_map(body))`` over the mesh axis: ``(state, batch, rng)`` with
  the state and key replicated and the batch split; ``seeds``: stacked
  states, ``(S, B, ...)`` batches and the seeds' base keys, each folded with
  ``key_step(state)``. The state is donated."""
  if not seeds:
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                            out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=(0,))

  def run(state, batch, base_rngs):
    rngs = jax.vmap(jax.random.fold_in, (0, None))(base_rngs, key_step(state))
    return jax.vmap(body, in_axes=(SEED_AXES, 0, 0), out_axes=(SEED_AXES, 0))(
        state, batch, rngs)
  sharded = jax.shard_map(run, mesh=mesh, in_specs=(P(), P(None, AXIS), P()),
                          out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=(0,))


def _on_device(body: Callable, mesh: jax.sharding.Mesh, seeds: str | None = None,
               key_step: Callable = _step_of) -> Callable:
  """``(state, data, indices, base_rng)``: ``body`` over ``k = indices.shape[0]``
  batches gathered from the device-resident ``data`` (``lax.scan`` when
  ``k > 1``), each with the key ``fold_in(base_rng, key_step(state))``;
  metrics stacked ``(k, ...)``. See :func:`make_loop_step`."""
  def run(state, data, indices, base_rng):
    def one(state, index):
      # The barrier materialises the gathered batch: fused into its consumers, the
      # gather made XLA CPU's matmuls read through it (MOSI-shaped step 0.63x).
      batch = jax.lax.optimization_barrier(gather_batch(data, index))
      return body(state, batch, jax.random.fold_in(base_rng, key_step(state)))
    if indices.shape[0] == 1:
      state, metrics = one(state, indices[0])
      return state, jax.tree.map(lambda x: x[None], metrics)
    return jax.lax.scan(one, state, indices)

  index_spec = P(None, AXIS)
  if seeds is not None:
    if seeds not in ("shared", "stacked"):
      raise ValueError(f"seeds must be None, 'shared' or 'stacked', got {seeds!r}")
    run = jax.vmap(run, in_axes=(SEED_AXES, None if seeds == "shared" else 0, 0, 0),
                   out_axes=(SEED_AXES, 1))
    index_spec = P(None, None, AXIS)
  sharded = jax.shard_map(run, mesh=mesh, in_specs=(P(), P(), index_spec, P()),
                          out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=(0,))


def make_parallel_step(method: Method, optimizer: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh, max_nonfinite: int = 0,
                       seeds: bool = False) -> Callable:
  """The data-parallel step: ``jit(shard_map(step))`` over the mesh axis ``data``.

  The state and the key are replicated; every leaf of the batch is split
  along its first axis. The state is donated.

  ``seeds=True``: ``S`` seeds in one program, ``step(state, batch, base_rngs)``
  with a stacked state (:func:`stack_states`), batches ``(S, B, ...)`` (split
  along ``B``) and the seeds' base keys ``(S,)``; seed ``i`` steps with the key
  ``fold_in(base_rngs[i], state.step)``, as its own run would.
  """
  step = make_train_step(method, optimizer, axis_name=AXIS, max_nonfinite=max_nonfinite)
  return _data_parallel(step, mesh, seeds)


def make_loop_step(method: Method, optimizer: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh, max_nonfinite: int = 0,
                   seeds: str | None = None) -> Callable:
  """``loop_step(state, data, indices, base_rng) -> (state, metrics)``: the
  training loop's dispatch, ``k = indices.shape[0]`` steps at once.

  ``data`` is the replicated device-resident split (:func:`device_data`),
  ``indices`` ``(k, B)`` int32 the sample indices of ``k`` consecutive
  global batches (sharded along ``B``, :func:`shard_indices`). Each device
  gathers its own rows, so the batches are exactly those of
  :func:`gather_batch` on the host; step ``s`` uses the key
  ``fold_in(base_rng, s)``. Metrics come back stacked, ``(k, ...)``. The
  state is donated.

  ``seeds``: ``S`` seeds in one program (``vmap``; :func:`stack_states`):
  ``"shared"`` when they train on one split (``data`` as above), ``"stacked"``
  when each has its own (``data`` leaves ``(S, N, ...)``); ``indices`` are
  ``(S, k, B)``, ``base_rng`` the ``(S,)`` keys, metrics ``(k, S, ...)``.

  Example:
    >>> loop_step = make_loop_step(method, optimizer, mesh)
    >>> state, metrics = loop_step(state, data, shard_indices(idx, mesh), key)
  """
  step = make_train_step(method, optimizer, axis_name=AXIS, max_nonfinite=max_nonfinite)
  return _on_device(step, mesh, seeds)


def make_parallel_periodic(method: Method, periodic: Periodic, mesh: jax.sharding.Mesh,
                           max_nonfinite: int = 0, seeds: bool = False,
                           on_device: str | None = None) -> Callable:
  """:func:`make_periodic_step` in the form of the step it goes with: that of
  :func:`make_parallel_step` (``seeds`` as there) or, with ``on_device``
  (``"single"``, ``"shared"`` or ``"stacked"``), that of :func:`make_loop_step`
  with the one step's indices ``(1, B)``. The key is the step's."""
  body = make_periodic_step(method, periodic, AXIS, max_nonfinite)
  key_step = _step_of if periodic.before else (lambda state: state.step - 1)
  if on_device is not None:
    return _on_device(body, mesh, None if on_device == "single" else on_device, key_step)
  return _data_parallel(body, mesh, seeds, key_step)


class StepFn:
  """One training step with the method's periodic programs around it.

  ``step_fn(state, batch, rng, step=None) -> (state, metrics)``: the periodic
  programs (:func:`make_parallel_periodic`) that fire at ``step`` run before
  or after ``train_step`` (:func:`make_parallel_step`), and the after ones'
  metrics replace the step's. ``step`` is the index of the step about to run;
  without it, it is read from ``state.step`` (a host synchronisation per
  step), so a loop that knows it should pass it.

  Example:
    >>> for s in range(100):
    ...   state, metrics = step_fn(state, shard_batch(batches(s), mesh), fold_in(key, s), s)
  """

  def __init__(self, train_step: Callable, periodic: Sequence[tuple[Periodic, Callable]] = ()):
    self.train_step, self.periodic = train_step, tuple(periodic)

  def __call__(self, state, batch, rng, step: int | None = None):
    if self.periodic and step is None:
      step = int(host_copy(state.step))
    for p, fn in self.periodic:
      if p.before and p.fires(step):
        state, _ = fn(state, batch, rng)
    state, metrics = self.train_step(state, batch, rng)
    for p, fn in self.periodic:
      if not p.before and p.fires(step):
        state, extra = fn(state, batch, rng)
        metrics = {**metrics, **{k: v for k, v in extra.items() if k in metrics}}
    return state, metrics

  def lower(self, state, batch, rng, step: int | None = None):
    """The train step's ``jax.stages.Lowered`` (its HLO, cost and memory
    analysis); ``step`` is accepted and ignored, as in ``__call__``'s arguments."""
    return self.train_step.lower(state, batch, rng)


def split_arrays(split) -> dict:
  """A split's arrays as :func:`gather_batch` takes them (``inputs``, ``masks``,
  ``labels``; host numpy), and ``present``, its ``(M,)`` presence row, when the
  split lacks modalities (``MultimodalSplit.absent``, a run's ``train.present``)."""
  out = {"inputs": dict(split.modalities), "masks": dict(split.masks),
         "labels": split.labels}
  if getattr(split, "absent", ()):
    out["present"] = split.present_row
  return out


def device_data(split, mesh: jax.sharding.Mesh) -> dict:
  """A split's arrays (:func:`split_arrays`), replicated on the mesh."""
  return jax.device_put(split_arrays(split), NamedSharding(mesh, P()))


def gather_batch(data: dict, index) -> dict:
  """The batch of the samples at ``index`` (as ``MultimodalSplit.batch``,
  without the host-side ``index``): works on numpy and on device arrays. The
  presence is the split's ``present`` row (:func:`split_arrays`) for every
  sample, or all True."""
  xp = jnp if isinstance(index, jax.Array) else np
  take = lambda x: x[index]
  inputs = {m: take(x) for m, x in data["inputs"].items()}
  shape = (index.shape[0], len(inputs))
  presence = (xp.ones(shape, bool) if "present" not in data
              else xp.broadcast_to(xp.asarray(data["present"], bool), shape))
  return {"inputs": inputs, "masks": {m: take(k) for m, k in data["masks"].items()},
          "presence": presence, "labels": take(data["labels"])}


def shard_indices(indices, mesh: jax.sharding.Mesh) -> jax.Array:
  """``(..., B)`` global sample indices on the mesh, split along ``B`` (the last axis)."""
  indices = np.asarray(indices, np.int32)
  sharding = NamedSharding(mesh, P(*[None] * (indices.ndim - 1), AXIS))
  n_proc, pid = jax.process_count(), jax.process_index()
  if n_proc == 1:
    return jax.device_put(indices, sharding)
  cols = indices.shape[-1] // n_proc
  return jax.make_array_from_process_local_data(
      sharding, indices[..., pid * cols:(pid + 1) * cols], indices.shape)


def device_batch(batch: dict) -> dict:
  """The arrays of a host batch that the step consumes (no sample index)."""
  return {k: v for k, v in batch.items() if k != "index"}


def shard_batch(batch: dict, mesh: jax.sharding.Mesh, seeds: bool = False) -> dict:
  """Places a *global* host batch on the mesh, split along the batch axis
  (the first; the second with ``seeds``, for ``(S, B, ...)`` seed stacks).

  With several processes each one passes the same global batch and
  contributes only its own contiguous rows
  (``jax.make_array_from_process_local_data``).
  """
  axis = 1 if seeds else 0
  sharding = NamedSharding(mesh, P(*[None] * axis, AXIS))
  n_proc, pid = jax.process_count(), jax.process_index()
  if n_proc == 1:
    return jax.device_put(batch, sharding)

  def put(x):
    rows = x.shape[axis] // n_proc
    local = np.take(x, np.arange(pid * rows, (pid + 1) * rows), axis=axis)
    return jax.make_array_from_process_local_data(sharding, local, x.shape)
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
