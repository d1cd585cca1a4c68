"""The training loop (:func:`train_loop`) and how its steps run (:class:`Pipeline`).

The loop never waits for the device between steps: batches are gathered on
the device on accelerators (``train.device_data``; on CPU the host gathers
them, measured faster there), ``train.steps_per_dispatch`` steps run per
call, and metrics and non-finite counters are copied to the host at logging,
validation and checkpoint intervals only.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from modalimmune_jax.step import (StepFn, device_data, gather_batch, host_copy,
                                  make_loop_step, make_parallel_periodic, make_parallel_step,
                                  seed_state, shard_batch, shard_indices, stack_states)
from modalimmune_jax.train.evaluation import evaluate_split
from modalimmune_jax.train.report import finish
from modalimmune_jax.train.run import Run
from modalimmune_jax.train.assemble import max_nonfinite
from modalimmune_jax.train.workdir import Interrupted, StopSignals

__all__ = ["Pipeline", "train_loop"]


class Pipeline:
  """How the loop's steps run: one run, or several seeds of one config as one
  vmapped program (``vmapped``); batches gathered inside the compiled step
  from the device-resident split, or on the host and put per step; the
  method's periodic programs (``Method.periodic``) around the steps they fire at.

  ``dispatch(state, step)`` runs ``k`` steps; ``fetch(metrics)`` copies their
  metrics to the host, ``(k, [S,] ...)``; ``state_of``, ``part`` and
  ``rows_of`` take run ``j``'s share of a state, a host tree and fetched metrics.
  """

  def __init__(self, runs: Sequence[Run], vmapped: bool):
    lead = runs[0]
    config, mesh, method = lead.config, lead.setup.mesh, lead.method
    t = config.train
    self.runs, self.vmapped, self.mesh, self.k = runs, vmapped, mesh, t.steps_per_dispatch
    shared = all(r.dataset is lead.dataset for r in runs)
    on_device = t.device_data == "device" or (
        t.device_data == "auto" and mesh.devices.flat[0].platform != "cpu")
    self.data = None  # host pipeline
    if on_device:
      self.data = (device_data(lead.dataset.splits["train"], mesh) if shared else
                   jax.device_put(jax.tree.map(lambda *xs: np.stack(xs),
                                               *[r.host_data for r in runs]),
                                  NamedSharding(mesh, P())))
    if vmapped:
      self.state = stack_states([r.state for r in runs])
      self.base = jax.numpy.stack([r.base_rng for r in runs])
      optimizer, max_bad = lead.setup.optimizer, max_nonfinite(config)
      seeds = "shared" if shared else "stacked"
      if on_device:
        self.loop_fn = make_loop_step(method, optimizer, mesh, max_bad, seeds=seeds)
        self.periodic = tuple((p, make_parallel_periodic(method, p, mesh, max_bad,
                                                         on_device=seeds))
                              for p in method.periodic)
      else:
        self.step_fn = StepFn(make_parallel_step(method, optimizer, mesh, max_bad, seeds=True),
                              [(p, make_parallel_periodic(method, p, mesh, max_bad, seeds=True))
                               for p in method.periodic])
    else:
      self.state, self.base = lead.state, lead.base_rng
      self.loop_fn, self.step_fn = lead.setup.loop_fn, lead.setup.step_fn
      self.periodic = lead.setup.loop_periodic

  def state_of(self, state, j: int):
    return seed_state(state, j) if self.vmapped else state

  def part(self, tree, j: int):
    return jax.tree.map(lambda x: x[j], tree) if self.vmapped else tree

  def rows_of(self, metrics, j: int):
    return jax.tree.map(lambda x: x[:, j], metrics) if self.vmapped else metrics

  def dispatch(self, state, step: int):
    """``k`` steps and the periodic programs that fire among them; the metrics
    as ``(steps' metrics, the after-programs' metrics)``."""
    k, mesh, runs = self.k, self.mesh, self.runs
    idx = [r.setup.batches.indices(step, k) for r in runs]
    if self.data is not None:
      return self._on_device(state, step, np.stack(idx) if self.vmapped else idx[0])
    outs = []
    for i in range(k):  # host pipeline: batch i + 1 is put while step i runs
      if self.vmapped:
        batch = jax.tree.map(lambda *xs: np.stack(xs),
                             *[gather_batch(r.host_data, ix[i]) for r, ix in zip(runs, idx)])
        state, metrics = self.step_fn(state, shard_batch(batch, mesh, seeds=True), self.base,
                                      step + i)
      else:
        batch = shard_batch(gather_batch(runs[0].host_data, idx[0][i]), mesh)
        state, metrics = self.step_fn(state, batch, jax.random.fold_in(self.base, step + i),
                                      step + i)
      outs.append(metrics)
    return state, (outs, [])

  def _on_device(self, state, step: int, indices):
    """The device pipeline: a periodic program that fires in the window of
    ``k`` steps runs before it with its first step's batch and key, or after
    it with its last step's (exactly the step it fires at when ``k = 1``)."""
    fires = lambda p: any(p.fires(s) for s in range(step, step + self.k))
    one = lambda i: shard_indices(indices[..., i:i + 1, :], self.mesh)  # (.., 1, B)
    for p, fn in self.periodic:
      if p.before and fires(p):
        state, _ = fn(state, self.data, one(0), self.base)
    state, metrics = self.loop_fn(state, self.data, shard_indices(indices, self.mesh),
                                  self.base)
    extras = []
    for p, fn in self.periodic:
      if not p.before and fires(p):
        state, extra = fn(state, self.data, one(self.k - 1), self.base)
        extras.append(jax.tree.map(lambda x: x[0], extra))
    return state, (metrics, extras)

  def fetch(self, metrics):
    """Host copies, stacked ``(k, ...)``; the after-programs' metrics replace
    the last step's."""
    metrics, extras = metrics
    if isinstance(metrics, list):
      host = jax.tree.map(lambda *xs: np.stack(xs), *host_copy(metrics))
    else:
      host = jax.tree.map(np.array, host_copy(metrics))  # writable copies
    for extra in host_copy(extras) if extras else ():
      for key, value in extra.items():
        if key in host:
          host[key][-1] = value
    return host


class _Metrics:
  """The metrics of one dispatch, copied to the host on first use only."""

  def __init__(self, pipe: Pipeline, metrics):
    self.pipe, self.metrics, self.host = pipe, metrics, None

  def all(self):
    if self.host is None:
      self.host = self.pipe.fetch(self.metrics)
    return self.host

  def of_run(self, j: int):
    return self.pipe.rows_of(self.all(), j)


def train_loop(runs: Sequence[Run], predict: Callable, vmapped: bool) -> list[dict[str, Any]]:
  """The loop over ``runs`` (one, or several seeds of one config as one vmapped
  program), then each run's evaluation with ``predict``. The runs are open and
  at one step."""
  lead = runs[0]
  config, t = lead.config, lead.config.train
  k, steps = t.steps_per_dispatch, t.steps
  pipe = Pipeline(runs, vmapped)
  state = pipe.state
  t_session = time.perf_counter()
  bar = tqdm(total=steps, initial=lead.start, disable=not lead.is_main, desc="train",
             unit="step", dynamic_ncols=True)
  first_step_seconds, stopped, done = None, False, lead.start
  try:
    with StopSignals() as signals:
      for step in range(lead.start, steps, k):
        t0 = time.perf_counter()
        state, metrics = pipe.dispatch(state, step)
        if first_step_seconds is None:
          jax.block_until_ready(state.step)
          first_step_seconds = time.perf_counter() - t0
        done = step + k
        bar.update(k)
        metrics = _Metrics(pipe, metrics)
        _write_events(runs, step, k, metrics)
        received = signals.received  # read once: a signal may arrive at any moment
        log_now = done % t.log_every == 0 or done == steps
        save_now = lead.ckpt is not None and (done % config.checkpoint.every == 0 or
                                              done in (steps, t.stop_after) or
                                              received is not None)
        if log_now or save_now:
          _check_and_log(runs, pipe, state, metrics if log_now else None, done,
                         time.perf_counter() - t_session, bar)
        if t.eval_every and done % t.eval_every == 0 and done < steps:
          _validate(runs, pipe, state, predict, done)
        if save_now:
          for j, r in enumerate(runs):
            r.save(done, pipe.state_of(state, j), time.perf_counter() - t_session)
        if received is not None:
          saved = "checkpoint saved" if lead.ckpt is not None else "no checkpoint (disabled)"
          raise Interrupted(f"{signal.Signals(received).name} at step {done}: {saved}; rerun "
                            "the same command to resume", received)
        if t.stop_after and done == t.stop_after and done < steps:
          stopped = True
          break
      _check_and_log(runs, pipe, state, None, done, 0.0, bar)
      if not stopped:  # the final state is a selection candidate too
        _select(runs, pipe, state, done)
  finally:
    bar.close()
    for r in runs:
      r.close()
  train_seconds = time.perf_counter() - t_session
  seeds = [r.config.seed for r in runs]
  return [finish(r, pipe.state_of(state, j), predict, stopped=stopped,
                 train_seconds=train_seconds, first_step_seconds=first_step_seconds,
                 seeds_together=seeds) for j, r in enumerate(runs)]


def _write_events(runs, step: int, k: int, metrics: _Metrics) -> None:
  """The method's records (``Method.events``) of the ``k`` steps from ``step``."""
  events = runs[0].method.events
  if events is None:
    return
  for j, r in enumerate(runs):
    for i in range(k):
      rows = lambda i=i, j=j: jax.tree.map(lambda x: x[i], metrics.of_run(j))
      for record in events(step + i + 1, rows):
        r.write_log(record)


def _check_and_log(runs, pipe: Pipeline, state, metrics: _Metrics | None, done: int,
                   seconds: float, bar) -> None:
  """Reads the non-finite counters (stops a halted run) and, given ``metrics``,
  logs the last step's training metrics."""
  health = host_copy(state.health)
  for j, r in enumerate(runs):
    h = pipe.part(health, j)
    r.check_health(h)
    if metrics is not None:
      values = {key: float(v) for key, v in jax.tree.map(lambda x: x[-1],
                                                         metrics.of_run(j)).items()}
      r.write_log({"step": done, "split": "train", **values,
                   "nonfinite_skipped": int(h.skipped), "seconds": round(seconds, 3)})
  if metrics is not None:
    bar.set_postfix(loss=f"{float(np.mean(metrics.all()['loss'][-1])):.4f}")


def _validate(runs, pipe: Pipeline, state, predict, done: int) -> None:
  """Each run's validation metrics (and selection score) at step ``done``."""
  for j, r in enumerate(runs):
    st = pipe.state_of(state, j)
    params, method_state = host_copy(st.params), r.eval_state(st)
    values = evaluate_split(predict, params, r.dataset.splits["valid"],
                            r.config.eval.batch_size, method_state)
    if r.selector is not None:
      values["selection_score"] = r.selector.consider(done, st, params, method_state)
    r.write_log({"step": done, "split": "valid", **values})


def _select(runs, pipe: Pipeline, state, done: int) -> None:
  for j, r in enumerate(runs):
    if r.selector is not None:
      st = pipe.state_of(state, j)
      r.selector.consider(done, st, host_copy(st.params), r.eval_state(st))
